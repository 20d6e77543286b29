"""The cpu-sampler over real gRPC: tokens equal the reference sampler, bad input is refused."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.core.config import load_config
from tandem.core.errors import ConfigError
from tandem.core.modeling.model_config import ModelConfig
from tandem.core.sampling.options import SamplingOptions
from tandem.core.sampling.reference import SequenceState, sample
from tandem.core.wire import codec
from tandem.cpu_sampler import SERVICE_NAME, SamplerConfig, serve
from tandem.cpu_sampler.runner import SamplerRunner
from tandem.v1 import common_pb2, cpu_sampler_pb2_grpc, tensor_pb2
from tandem.v1 import cpu_sampler_pb2 as pb

VOCAB = 64
LIMIT = 1000
TIMEOUT_S = 30

SEQUENCES = [
    pb.SamplerSequence(request_id="greedy", params=common_pb2.SamplingParams(temperature=0.0, logprobs=2),
                       seed=1, prompt_ids=[1, 2, 3]),
    pb.SamplerSequence(request_id="nucleus", seed=2, prompt_ids=[4, 5],
                       params=common_pb2.SamplingParams(temperature=0.9, top_p=0.9, top_k=20, logprobs=3)),
    pb.SamplerSequence(request_id="penalized", seed=3, prompt_ids=[7, 7, 8], output_ids=[9, 9, 10],
                       min_tokens_blocked_ids=[0], params=common_pb2.SamplingParams(
                           repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.2,
                           min_tokens=5, logit_bias={11: 2.0})),
]


@dataclass
class Replica:
    runner: SamplerRunner
    stub: cpu_sampler_pb2_grpc.CpuSamplerStub
    channel: grpc.Channel
    address: str

    def subscribe(self) -> Iterator[pb.SampledBatch]:
        """Open a Results stream and wait for its confirmation (an empty batch, step 0)."""
        results = self.stub.Results(pb.ResultsRequest(), timeout=TIMEOUT_S)
        first = next(results)
        assert first.step_id == 0 and not first.tokens
        return results


@pytest.fixture
def start_replica(request):
    """start_replica() -> a running sampler on 127.0.0.1, port 0, stopped after the test."""

    def start() -> Replica:
        config = SamplerConfig(host="127.0.0.1", port=0, max_workers=8, vocab_size=VOCAB)
        runner = SamplerRunner(config)
        server = serve(config, runner)
        channel = grpc.insecure_channel(server.address)

        def stop() -> None:
            channel.close()
            server.stop(grace_s=0)

        request.addfinalizer(stop)
        return Replica(runner, cpu_sampler_pb2_grpc.CpuSamplerStub(channel), channel, server.address)

    return start


def frame(step: int, request_ids: list[str], sample_indices: list[int], logits: torch.Tensor) -> pb.LogitsFrame:
    return pb.LogitsFrame(step_id=step, request_ids=request_ids, sample_indices=sample_indices,
                          logits=codec.encode(logits))


def reference_states() -> dict[str, SequenceState]:
    return {
        seq.request_id: SequenceState(seq.request_id, SamplingOptions.from_proto(seq.params, VOCAB, LIMIT), seq.seed,
                                      seq.prompt_ids, seq.output_ids, seq.min_tokens_blocked_ids)
        for seq in SEQUENCES
    }


def steps(num_steps: int) -> list[tuple[list[str], list[int], torch.Tensor]]:
    """Rows for every sequence at each step, in a different row order each step."""
    start = {seq.request_id: len(seq.output_ids) for seq in SEQUENCES}
    generator = torch.Generator().manual_seed(0)
    out = []
    for step in range(num_steps):
        ids = [seq.request_id for seq in SEQUENCES][step % 3:] + [seq.request_id for seq in SEQUENCES][: step % 3]
        out.append((ids, [start[i] + step for i in ids], torch.randn(len(ids), VOCAB, generator=generator) * 2))
    return out


def test_tokens_equal_the_reference_sampler(start_replica):
    replica = start_replica()
    replica.stub.AddSequences(pb.AddSequencesRequest(sequences=SEQUENCES), timeout=TIMEOUT_S)
    results = replica.subscribe()
    plan = steps(4)
    summary = replica.stub.Logits(iter([frame(n, *rows) for n, rows in enumerate(plan)]), timeout=TIMEOUT_S)
    assert summary.num_frames == 4
    states = reference_states()
    for n, (ids, indices, logits) in enumerate(plan):
        batch = next(results)
        expected = sample(logits, [states[i] for i in ids], indices)
        assert batch.step_id == n and batch.error == "" and batch.sample_ns > 0
        assert [(t.request_id, t.sample_index) for t in batch.tokens] == list(zip(ids, indices))
        for token, (token_id, logprobs) in zip(batch.tokens, expected):
            assert token.token_id == token_id
            assert token.HasField("logprobs") == (logprobs is not None)
            if logprobs is not None:
                assert token.logprobs == logprobs
    info = replica.stub.GetSamplerInfo(pb.GetSamplerInfoRequest(), timeout=TIMEOUT_S)
    assert (info.num_sequences, info.num_frames_total, info.num_rows_total) == (3, 4, 12)


def test_two_replicas_give_identical_tokens(start_replica):
    a, b = start_replica(), start_replica()
    for replica in (a, b):
        replica.stub.AddSequences(pb.AddSequencesRequest(sequences=SEQUENCES), timeout=TIMEOUT_S)
    ids, indices, logits = steps(1)[0]
    got = {}
    for replica, rows in ((a, [0, 1, 2]), (b, [2, 1])):  # b gets fewer rows, in another order
        results = replica.subscribe()
        replica.stub.Logits(iter([frame(0, [ids[r] for r in rows], [indices[r] for r in rows], logits[rows])]),
                            timeout=TIMEOUT_S)
        got[replica.address] = {t.request_id: t.token_id for t in next(results).tokens}
    assert got[b.address] == {i: got[a.address][i] for i in got[b.address]}


def raw_frame(logits: tensor_pb2.Tensor, request_ids=("greedy",), sample_indices=(0,)) -> pb.LogitsFrame:
    return pb.LogitsFrame(step_id=7, request_ids=request_ids, sample_indices=sample_indices, logits=logits)


GOOD = codec.encode(torch.zeros(1, VOCAB))
MALFORMED = {
    "byte count": (raw_frame(tensor_pb2.Tensor(dtype="float32", shape=[1, VOCAB], data=GOOD.data[:-4])),
                   "payload has"),
    "rank": (raw_frame(codec.encode(torch.zeros(VOCAB))), "rank-2"),
    "rows != ids": (raw_frame(codec.encode(torch.zeros(2, VOCAB))), "2 rows but the frame has 1 request ids"),
    "ids != indices": (raw_frame(GOOD, sample_indices=(0, 1)), "1 request ids and 2 sample indices"),
    "unknown dtype": (raw_frame(tensor_pb2.Tensor(dtype="float8", shape=[1, VOCAB], data=GOOD.data)),
                      "unknown dtype 'float8'"),
    "wrong dtype": (raw_frame(codec.encode(torch.zeros(1, VOCAB, dtype=torch.float16))), "expected float32"),
}


class OpenStream:
    """A Logits client stream kept open: frames are fed through a queue."""

    def __init__(self, stub: cpu_sampler_pb2_grpc.CpuSamplerStub):
        self._frames: queue.Queue[pb.LogitsFrame | None] = queue.Queue()
        self.future = stub.Logits.future(iter(self._frames.get, None), timeout=TIMEOUT_S)

    def send(self, item: pb.LogitsFrame) -> None:
        self._frames.put(item)

    def close(self) -> pb.LogitsSummary:
        self._frames.put(None)
        return self.future.result()


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_frame_ends_only_its_stream(start_replica, case):
    replica = start_replica()
    replica.stub.AddSequences(pb.AddSequencesRequest(sequences=SEQUENCES), timeout=TIMEOUT_S)
    results = replica.subscribe()
    good = OpenStream(replica.stub)
    good.send(frame(1, ["greedy"], [0], torch.randn(1, VOCAB)))
    assert next(results).step_id == 1

    bad, phrase = MALFORMED[case]
    with pytest.raises(grpc.RpcError) as info:
        replica.stub.Logits(iter([bad]), timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "logits frame 0 (step 7)" in info.value.details() and phrase in info.value.details()

    good.send(frame(2, ["greedy"], [1], torch.randn(1, VOCAB)))
    assert [t.sample_index for t in next(results).tokens] == [1]
    assert good.close().num_frames == 2


def test_invalid_params_are_refused_naming_the_field(start_replica):
    replica = start_replica()
    bad = pb.SamplerSequence(request_id="bad", params=common_pb2.SamplingParams(top_p=1.5))
    with pytest.raises(grpc.RpcError) as info:
        replica.stub.AddSequences(pb.AddSequencesRequest(sequences=[SEQUENCES[0], bad]), timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sequences[1] (request 'bad')" in info.value.details() and "top_p=1.5" in info.value.details()
    assert replica.stub.GetSamplerInfo(pb.GetSamplerInfoRequest(), timeout=TIMEOUT_S).num_sequences == 0


def test_unknown_rows_are_skipped_and_named(start_replica):
    replica = start_replica()
    replica.stub.AddSequences(pb.AddSequencesRequest(sequences=SEQUENCES), timeout=TIMEOUT_S)
    replica.stub.ReleaseSequences(pb.ReleaseSequencesRequest(request_ids=["nucleus", "never-added"]),
                                  timeout=TIMEOUT_S)
    results = replica.subscribe()
    replica.stub.Logits(iter([frame(3, ["greedy", "nucleus"], [0, 0], torch.randn(2, VOCAB))]), timeout=TIMEOUT_S)
    batch = next(results)
    assert [t.request_id for t in batch.tokens] == ["greedy"]
    assert "unknown request 'nucleus'" in batch.error
    info = replica.stub.GetSamplerInfo(pb.GetSamplerInfoRequest(), timeout=TIMEOUT_S)
    assert (info.num_sequences, info.num_frames_total, info.num_rows_total) == (len(SEQUENCES) - 1, 1, 1)


def test_token_ids_outside_the_configured_vocabulary_are_refused_on_add(start_replica):
    replica = start_replica()
    out_of_vocab = pb.SamplerSequence(request_id="oov", params=common_pb2.SamplingParams(logit_bias={VOCAB: 1.0}))
    with pytest.raises(grpc.RpcError) as info:
        replica.stub.AddSequences(pb.AddSequencesRequest(sequences=[out_of_vocab]), timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request 'oov'" in info.value.details() and "logit_bias" in info.value.details()


@pytest.mark.parametrize("structured", [False, True])
def test_a_frame_of_the_wrong_width_is_refused_and_never_sets_the_vocabulary(start_replica, structured):
    """A fresh replica knows its vocabulary from its configuration: the first frame it ever sees,
    one column too wide, is refused naming both widths, and frames of the right width still sample."""
    replica = start_replica()
    replica.stub.AddSequences(pb.AddSequencesRequest(sequences=SEQUENCES), timeout=TIMEOUT_S)
    results = replica.subscribe()
    wide = torch.randn(1, VOCAB + 1)
    if structured:
        bad = [pb.LogitsFrame(layout=tensor_pb2.TensorLayout(dtype="float32", row_shape=[VOCAB + 1])),
               pb.LogitsFrame(step_id=7, data=codec.raw(wide))]
    else:
        bad = [frame(7, ["greedy"], [0], wide)]
    with pytest.raises(grpc.RpcError) as info:
        replica.stub.Logits(iter(bad), timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{VOCAB + 1}" in info.value.details() and f"vocabulary has {VOCAB} tokens" in info.value.details()
    assert replica.runner.engine.vocab_size == VOCAB
    assert replica.stub.Logits(iter([frame(1, ["greedy"], [0], torch.randn(1, VOCAB))]), timeout=TIMEOUT_S).num_frames == 1
    assert [t.request_id for t in next(results).tokens] == ["greedy"]


def test_the_vocabulary_comes_from_the_model_or_vocab_size(checkpoint, tmp_path):
    model = str(checkpoint("llama"))
    vocab = ModelConfig.from_dir(model).vocab_size
    assert SamplerConfig(model=model).vocabulary() == SamplerRunner(SamplerConfig(model=model)).engine.vocab_size == vocab
    assert SamplerConfig(vocab_size=5).vocabulary() == 5
    with pytest.raises(ConfigError, match=f"'vocab_size'=5 differs from the model's {vocab}"):
        SamplerConfig(model=model, vocab_size=5).vocabulary()
    with pytest.raises(ConfigError, match="config field 'model'"):
        load_config(SamplerConfig, {"port": 1})
    with pytest.raises(ConfigError, match="cannot read its config.json"):
        SamplerConfig(model=str(tmp_path / "missing")).vocabulary()


def test_results_stream_ends_when_the_client_cancels(start_replica):
    replica = start_replica()
    results = replica.subscribe()
    results.cancel()
    wait_for_no_subscribers(replica.runner)


def wait_for_no_subscribers(runner: SamplerRunner) -> None:
    deadline = time.monotonic() + 5
    while len(runner.subscribers):
        assert time.monotonic() < deadline, "the Results stream never ended on the server"
        time.sleep(0.01)


def test_health_reports_serving(start_replica):
    replica = start_replica()
    health = health_pb2_grpc.HealthStub(replica.channel)
    for service in ("", SERVICE_NAME):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    assert SERVICE_NAME == "tandem.v1.CpuSampler"


def test_results_stream_ends_when_the_server_stops():
    config = SamplerConfig(vocab_size=VOCAB)
    runner = SamplerRunner(config)
    server = serve(config, runner)
    with grpc.insecure_channel(server.address) as channel:
        replica = Replica(runner, cpu_sampler_pb2_grpc.CpuSamplerStub(channel), channel, server.address)
        results = replica.subscribe()
        server.stop(grace_s=0)
        with pytest.raises(grpc.RpcError):
            next(results)
    wait_for_no_subscribers(runner)


def test_a_hosting_stage_gets_the_tokens_before_the_results_subscribers():
    """`sample(..., first=...)`, as a last stage that samples in-process calls it: `first` gets the
    tokens (for stage 0, the pipeline's critical path) while no Results subscriber has the batch
    yet; the subscribers get it right after, with the same tokens."""
    runner = SamplerRunner(SamplerConfig(vocab_size=VOCAB))
    runner.add([pb.SamplerSequence(request_id=r, params=common_pb2.SamplingParams(temperature=0.0))
                for r in ("a", "b")])
    subscriber = runner.subscribers.subscribe()
    seen: list = []
    logits = torch.zeros(2, VOCAB)
    logits[0, 7], logits[1, 9] = 1.0, 1.0
    returned = runner.sample(4, ["a", "b"], [0, 0], logits,
                             first=lambda tokens: seen.append((tokens, subscriber.queue.qsize())))
    assert seen == [([("a", 7), ("b", 9)], 0)]  # before any subscriber had the batch
    batch = subscriber.queue.get_nowait()
    assert batch.step_id == 4 and [(t.request_id, t.token_id) for t in batch.tokens] == returned == seen[0][0]
