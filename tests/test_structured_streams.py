"""Structure-aware transmission and the shared-memory logits ring.

A structure-aware stream sends its tensor layout once; later frames are a step tag and raw bytes
shaped by the receiver's plan. A sampler on the last stage's host reads logits from a ring of
shared-memory slots whose handle alone crosses gRPC. Tokens must not depend on the path taken.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch

from cluster import start_cluster
from tandem.client import TandemClient
from tandem.core.errors import CodecError
from tandem.core.wire import codec, shm_ring
from tandem.core.wire.shm_ring import RingReader, RingWriter
from tandem.cpu_sampler import SamplerConfig, serve
from tandem.v1 import common_pb2, cpu_sampler_pb2_grpc, stage_worker_pb2, stage_worker_pb2_grpc, tensor_pb2
from tandem.v1 import cpu_sampler_pb2 as pb

VOCAB = 64
TIMEOUT_S = 30
SEQUENCES = [
    pb.SamplerSequence(request_id="greedy", seed=1, prompt_ids=[1, 2], params=common_pb2.SamplingParams(temperature=0.0)),
    pb.SamplerSequence(request_id="nucleus", seed=2, prompt_ids=[3], params=common_pb2.SamplingParams(
        temperature=0.9, top_p=0.9, repetition_penalty=1.2, logprobs=2)),
]
IDS = [s.request_id for s in SEQUENCES]
LAYOUT = tensor_pb2.TensorLayout(dtype="float32", row_shape=[VOCAB])


# --- codec ----------------------------------------------------------------------------------

def test_raw_frames_round_trip_with_the_plans_row_count():
    x = torch.randn(5, 12)
    layout = codec.layout(x.dtype, x.shape[1:])
    assert layout.dtype == "float32" and list(layout.row_shape) == [12]
    assert torch.equal(codec.decode_rows(codec.raw(x), layout, 5), x)
    bf = torch.randn(3, 8).to(torch.bfloat16)
    assert torch.equal(codec.decode_rows(codec.raw(bf), codec.layout(bf.dtype, bf.shape[1:]), 3), bf)
    assert codec.decode_rows(b"", layout, 0).shape == (0, 12)


def test_raw_frames_that_do_not_fit_the_plan_are_refused():
    x = torch.randn(5, 12)
    with pytest.raises(CodecError, match="payload has 240 bytes, but the plan's 4 rows"):
        codec.decode_rows(codec.raw(x), codec.layout(x.dtype, x.shape[1:]), 4)
    with pytest.raises(CodecError, match="unknown dtype 'complex64'"):
        codec.decode_rows(b"", tensor_pb2.TensorLayout(dtype="complex64", row_shape=[2]), 0)
    with pytest.raises(CodecError, match="negative dim"):
        codec.decode_rows(b"", tensor_pb2.TensorLayout(dtype="float32", row_shape=[-2]), 1)
    with pytest.raises(CodecError, match="layout dtype is 'float16', expected float32"):
        codec.check_layout(tensor_pb2.TensorLayout(dtype="float16", row_shape=[12]), torch.float32, [12])
    with pytest.raises(CodecError, match=r"row shape is \[13\], expected \[12\]"):
        codec.check_layout(tensor_pb2.TensorLayout(dtype="float32", row_shape=[13]), torch.float32, [12])


# --- the ring -------------------------------------------------------------------------------

def test_ring_hands_over_tensors_and_never_rewrites_a_full_slot():
    writer = RingWriter(slots=2, slot_bytes=4 * 3 * VOCAB)
    reader = RingReader(writer.path, writer.nonce, 2, writer.slot_bytes)
    writer.unlink()  # both ends keep their mapping
    assert not os.path.exists(writer.path)
    a, b, c = (torch.randn(3, VOCAB) for _ in range(3))
    slot_a, n = writer.put(a, timeout_s=1)
    slot_b, _ = writer.put(b, timeout_s=1)
    assert (slot_a, slot_b, n) == (0, 1, a.numel() * 4)
    # both slots are full: the third tensor must wait, and gives up rather than overwrite `a`
    assert writer.put(c, timeout_s=0.05) is None
    assert torch.equal(reader.view(slot_a, n, torch.float32).view(3, VOCAB), a)
    reader.free(slot_a)
    assert writer.put(c, timeout_s=1) == (0, n)
    assert torch.equal(reader.view(0, n, torch.float32).view(3, VOCAB), c)
    assert torch.equal(reader.view(1, n, torch.float32).view(3, VOCAB), b)
    assert writer.put(torch.randn(4, VOCAB), timeout_s=1) is None  # larger than a slot


def test_ring_reader_checks_what_it_is_offered(tmp_path):
    writer = RingWriter(slots=2, slot_bytes=256)
    try:
        with pytest.raises(FileNotFoundError, match="another nonce"):
            RingReader(writer.path, b"x" * 16, 2, 256)
        with pytest.raises(FileNotFoundError, match="is not"):
            RingReader(writer.path, writer.nonce, 3, 256)
        with pytest.raises(ValueError, match="must be a tandem-logits-"):
            RingReader(str(tmp_path / "tandem-logits-1"), writer.nonce, 2, 256)
        with pytest.raises(ValueError, match="must be a tandem-logits-"):
            RingReader("/dev/shm/../etc/passwd", writer.nonce, 2, 256)
        reader = RingReader(writer.path, writer.nonce, 2, 256)
        with pytest.raises(ValueError, match="outside the ring"):
            reader.view(2, 16, torch.float32)
        with pytest.raises(ValueError, match="outside the ring"):
            reader.view(0, 260, torch.float32)
        with pytest.raises(ValueError, match="is not full"):
            reader.view(0, 16, torch.float32)
    finally:
        writer.unlink()


def test_rings_of_dead_processes_are_removed():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = os.path.join(shm_ring.SHM_DIR, f"{shm_ring.PREFIX}{dead.pid}-test")
    open(stale, "wb").close()
    writer = RingWriter(slots=1, slot_bytes=64)
    writer.unlink()
    assert not os.path.exists(stale)


# --- a sampler replica fed structure-aware frames -------------------------------------------

@pytest.fixture
def replica(request):
    config = SamplerConfig(vocab_size=VOCAB, max_workers=8, plan_wait_s=0.5)
    server = serve(config)
    channel = grpc.insecure_channel(server.address)
    stub = cpu_sampler_pb2_grpc.CpuSamplerStub(channel)
    stub.AddSequences(pb.AddSequencesRequest(sequences=SEQUENCES), timeout=TIMEOUT_S)
    results = stub.Results(pb.ResultsRequest(), timeout=TIMEOUT_S)
    assert next(results).step_id == 0
    yield stub, results
    channel.close()
    server.stop(grace_s=0)


def _logits(step: int) -> torch.Tensor:
    return torch.randn(len(IDS), VOCAB, generator=torch.Generator().manual_seed(step)) * 3


def _plan(step: int) -> pb.SamplePlan:
    return pb.SamplePlan(step_id=step, request_ids=IDS, sample_indices=[step - 1] * len(IDS))


def _tokens(results, num_steps: int) -> list[list[int]]:
    out = []
    for _ in range(num_steps):
        batch = next(results)
        assert not batch.error, batch.error
        out.append([t.token_id for t in batch.tokens])
    return out


def test_raw_frames_and_ring_slots_sample_the_same_tokens_as_whole_tensors(request):
    def run(kind: str) -> list[list[int]]:
        config = SamplerConfig(vocab_size=VOCAB, max_workers=8)
        server = serve(config)
        request.addfinalizer(lambda: server.stop(grace_s=0))
        with grpc.insecure_channel(server.address) as channel:
            stub = cpu_sampler_pb2_grpc.CpuSamplerStub(channel)
            stub.AddSequences(pb.AddSequencesRequest(sequences=SEQUENCES), timeout=TIMEOUT_S)
            results = stub.Results(pb.ResultsRequest(), timeout=TIMEOUT_S)
            next(results)
            writer = None
            if kind != "tensor":
                # plans go on their own stream; the last plan arrives after its frame was sent
                stub.Plans(iter([_plan(s) for s in range(1, 5)]), timeout=TIMEOUT_S)
            if kind == "ring":
                writer = RingWriter(slots=2, slot_bytes=len(IDS) * VOCAB * 4)
                stub.AttachLogitsRing(pb.AttachLogitsRingRequest(
                    ring_id="r1", path=writer.path, nonce=writer.nonce, slots=2, slot_bytes=writer.slot_bytes))
                writer.unlink()

            def feed():  # frames built as they go: five through two ring slots needs the sampler to free them
                if kind != "tensor":
                    yield pb.LogitsFrame(layout=LAYOUT, ring_id="r1" if writer else "")
                for s in range(1, 6):
                    if kind == "tensor":
                        yield pb.LogitsFrame(step_id=s, request_ids=IDS, sample_indices=[s - 1] * 2,
                                             logits=codec.encode(_logits(s)))
                    elif writer is not None:
                        slot, nbytes = writer.put(_logits(s), timeout_s=10)
                        yield pb.LogitsFrame(step_id=s, ring_slot=pb.RingSlot(index=slot, nbytes=nbytes))
                    else:
                        yield pb.LogitsFrame(step_id=s, data=codec.raw(_logits(s)))
                if kind != "tensor":
                    time.sleep(0.1)
                    stub.Plans(iter([_plan(5)]), timeout=TIMEOUT_S)

            sent = threading.Thread(target=lambda: stub.Logits(feed(), timeout=TIMEOUT_S))
            sent.start()
            tokens = _tokens(results, 5)
            sent.join()
            info = stub.GetSamplerInfo(pb.GetSamplerInfoRequest(), timeout=TIMEOUT_S)
            raw_bytes = 5 * len(IDS) * VOCAB * 4
            assert info.tensor_bytes_in_total == raw_bytes
            assert info.shm_bytes_in_total == (raw_bytes if kind == "ring" else 0)
            if kind == "ring":
                assert info.wire_bytes_in_total < 100  # handles only
            return tokens

    tensor = run("tensor")
    assert run("raw") == tensor
    assert run("ring") == tensor


def test_a_frame_whose_plan_never_comes_is_reported_not_lost(replica):
    stub, results = replica
    stub.Logits(iter([pb.LogitsFrame(layout=LAYOUT), pb.LogitsFrame(step_id=3, data=codec.raw(_logits(3)))]),
                timeout=TIMEOUT_S)
    batch = next(results)
    assert batch.step_id == 3 and not batch.tokens and "no plan for step 3" in batch.error


@pytest.mark.parametrize("frames, phrase", [
    ([pb.LogitsFrame(step_id=1, data=b"\0" * 8)], "before the stream's layout frame"),
    ([pb.LogitsFrame(layout=tensor_pb2.TensorLayout(dtype="float16", row_shape=[VOCAB]))], "must be float32 [vocab]"),
    ([pb.LogitsFrame(layout=LAYOUT, ring_id="nope")], "unknown ring id 'nope'"),
    ([pb.LogitsFrame(layout=LAYOUT), pb.LogitsFrame(step_id=1, ring_slot=pb.RingSlot(index=0, nbytes=8))],
     "a ring slot on a stream without a ring"),
    ([pb.LogitsFrame(layout=LAYOUT), pb.LogitsFrame(step_id=1, data=b"\0" * 12)], "payload has 12 bytes"),
])
def test_malformed_structured_frames_are_invalid_argument(replica, frames, phrase):
    stub, _ = replica
    stub.Plans(iter([_plan(1)]), timeout=TIMEOUT_S)
    with pytest.raises(grpc.RpcError) as e:
        stub.Logits(iter(frames), timeout=TIMEOUT_S)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and phrase in e.value.details()


def test_ring_handles_are_checked(replica):
    stub, _ = replica
    writer = RingWriter(slots=1, slot_bytes=len(IDS) * VOCAB * 4)
    try:
        stub.AttachLogitsRing(pb.AttachLogitsRingRequest(ring_id="r", path=writer.path, nonce=writer.nonce,
                                                         slots=1, slot_bytes=writer.slot_bytes), timeout=TIMEOUT_S)
        stub.Plans(iter([_plan(1), _plan(2)]), timeout=TIMEOUT_S)
        frames = [pb.LogitsFrame(layout=LAYOUT, ring_id="r"),
                  pb.LogitsFrame(step_id=1, ring_slot=pb.RingSlot(index=0, nbytes=len(IDS) * VOCAB * 4))]
        with pytest.raises(grpc.RpcError) as e:  # the slot was never filled
            stub.Logits(iter(frames), timeout=TIMEOUT_S)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "is not full" in e.value.details()
    finally:
        writer.unlink()


def test_attaching_a_ring_that_cannot_be_seen_fails_cleanly(replica):
    stub, _ = replica
    request = pb.AttachLogitsRingRequest(ring_id="r", path=f"{shm_ring.SHM_DIR}/{shm_ring.PREFIX}0-missing",
                                         nonce=b"0" * 16, slots=1, slot_bytes=64)
    with pytest.raises(grpc.RpcError) as e:
        stub.AttachLogitsRing(request, timeout=TIMEOUT_S)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "cannot map the logits ring" in e.value.details()
    request.path = "/etc/passwd"
    with pytest.raises(grpc.RpcError) as e:
        stub.AttachLogitsRing(request, timeout=TIMEOUT_S)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ring path must be" in e.value.details()


# --- stages ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama(checkpoint):
    return checkpoint("llama")


def _stage_infos(c) -> list[stage_worker_pb2.GetStageInfoResponse]:
    infos = []
    for address in c.stages:
        with grpc.insecure_channel(address) as ch:
            infos.append(stage_worker_pb2_grpc.StageWorkerStub(ch).GetStageInfo(
                stage_worker_pb2.GetStageInfoRequest(), timeout=TIMEOUT_S))
    return infos


@pytest.mark.parametrize("preset", ["full", "full-shared_memory_logits", "full-structured_streams"])
def test_bytes_per_hop_follow_the_switches(llama, reference_model, preset):
    """Greedy output equals transformers on every path; frames cost the tensor bytes plus a small
    tag, and with the ring the logits cross gRPC as handles only. The requests ask for logprobs, so
    their rows go to the sampler replica (an argmax-only row stays on the last stage)."""
    prompts = ([5, 7, 9], [100, 4, 40, 41])
    c = start_cluster(llama, num_stages=2, num_samplers=1, preset=preset)
    try:
        with TandemClient(c.endpoint, timeout_s=60) as client:
            tokens = [list(client.generate(prompt_ids=p, max_tokens=6, temperature=0.0, ignore_eos=True,
                                           logprobs=0).token_ids) for p in prompts]
        first, last = _stage_infos(c)
    finally:
        c.stop()
    model = reference_model(llama)
    for prompt, got in zip(prompts, tokens):
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, len(prompt):].tolist()
        assert got == expected
    # activations: raw bytes and a step tag (structured) or a whole Tensor with its shape each frame
    overhead = (first.wire_bytes_out_total - first.tensor_bytes_out_total) / first.frames_out_total
    assert overhead < (16 if preset != "full-structured_streams" else 64)
    assert overhead > (0 if preset != "full-structured_streams" else 16)
    if preset == "full-shared_memory_logits":
        assert last.shm_bytes_out_total == 0
        assert last.tensor_bytes_out_total <= last.wire_bytes_out_total < 1.01 * last.tensor_bytes_out_total
    else:
        assert last.shm_bytes_out_total == last.tensor_bytes_out_total > 0
        per_frame = last.wire_bytes_out_total / last.frames_out_total  # a slot handle (and row ids unstructured)
        assert per_frame < 24 if preset == "full" else 24 < per_frame < 128


def test_raw_activations_are_checked_against_the_stream_layout(llama):
    c = start_cluster(llama, num_stages=2, num_samplers=1)
    try:
        with grpc.insecure_channel(c.stages[1]) as ch:
            stub = stage_worker_pb2_grpc.StageWorkerStub(ch)
            for frames, phrase in [
                ([stage_worker_pb2.ActivationFrame(step_id=10**9, data=b"\0" * 8)], "before the stream's layout frame"),
                ([stage_worker_pb2.ActivationFrame(layout=tensor_pb2.TensorLayout(dtype="float32", row_shape=[7]))],
                 "row shape is [7]"),
            ]:
                with pytest.raises(grpc.RpcError) as e:
                    stub.Activations(iter(frames), timeout=TIMEOUT_S)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and phrase in e.value.details()
        with TandemClient(c.endpoint, timeout_s=60) as client:  # still serving
            assert len(client.generate(prompt_ids=[5, 6], max_tokens=3, ignore_eos=True).token_ids) == 3
    finally:
        c.stop()
