"""The four services end to end on loopback, checked against transformers."""

from __future__ import annotations

import threading
import time
from itertools import islice

import grpc
import pytest
import torch

from cluster import start_cluster
from tandem.client import TandemClient
from tandem.client import errors as client_errors
from tandem.v1 import cpu_sampler_pb2, cpu_sampler_pb2_grpc, stage_worker_pb2, stage_worker_pb2_grpc, tensor_pb2
from test_metrics import scrape

PROMPTS = [[5, 7, 9, 11, 13, 200, 3], [100, 4, 40], list(range(20, 47)), [300, 17]]
MAX_TOKENS = 10


def reference(model, prompt: list[int], max_tokens: int = MAX_TOKENS) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def run_concurrently(endpoint: str, prompts, stagger_s: float = 0.05, **sampling) -> list[list[int]]:
    """Send every prompt from its own thread, each starting a little after the previous."""
    results: list = [None] * len(prompts)

    def one(i: int) -> None:
        time.sleep(i * stagger_s)
        with TandemClient(endpoint, timeout_s=120) as client:
            results[i] = client.generate(prompt_ids=prompts[i], **sampling)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is not None for r in results), "a request did not finish"
    return results


@pytest.fixture(scope="module")
def llama(checkpoint):
    return checkpoint("llama")


@pytest.fixture(scope="module")
def cluster2(llama):
    c = start_cluster(llama, num_stages=2, num_samplers=2)
    yield c
    c.stop()


def assert_all_released(cluster, timeout_s: float = 10.0) -> None:
    """Nothing is held anywhere: as the coordinator reports it (its figures of the other services
    are refreshed in the background) and as each stage and sampler answers when asked directly."""
    deadline = time.monotonic() + timeout_s
    with TandemClient(cluster.endpoint) as client:
        while True:
            info = client.server_info()
            used = [info.kv_blocks_used] + [s.kv_blocks_used for s in info.stages] + [s.num_sequences for s in info.samplers]
            used += direct_figures(cluster)
            if not any(used) and info.num_requests_running == 0:
                return
            assert time.monotonic() < deadline, f"resources still held: {info} {used}"
            time.sleep(0.1)


def direct_figures(cluster) -> list[int]:
    figures = []
    for address in cluster.stages:
        with grpc.insecure_channel(address) as ch:
            stub = stage_worker_pb2_grpc.StageWorkerStub(ch)
            figures.append(stub.GetStageInfo(stage_worker_pb2.GetStageInfoRequest(), timeout=10).kv_blocks_used)
    for address in cluster.samplers:
        with grpc.insecure_channel(address) as ch:
            stub = cpu_sampler_pb2_grpc.CpuSamplerStub(ch)
            figures.append(stub.GetSamplerInfo(cpu_sampler_pb2.GetSamplerInfoRequest(), timeout=10).num_sequences)
    return figures


@pytest.mark.parametrize("preset", ["full", "baseline"])
@pytest.mark.parametrize("num_stages", [2, 3])
def test_greedy_matches_transformers_under_concurrency(llama, reference_model, num_stages, preset):
    c = start_cluster(llama, num_stages=num_stages, num_samplers=2, preset=preset)
    try:
        results = run_concurrently(c.endpoint, PROMPTS, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        for prompt, r in zip(PROMPTS, results):
            assert list(r.token_ids) == reference(reference_model(llama), prompt)
            assert r.finish_reason == "length" and r.usage.completion_tokens == MAX_TOKENS
        assert_all_released(c)
        # full chains decode steps once every request is in (decode_chaining); baseline never does
        assert (chained_steps(c) > 0) == (preset == "full")
    finally:
        c.stop()


def chained_steps(cluster) -> float:
    return sum(v for (name, _), v in scrape(cluster.coordinator_metrics).items() if name.endswith("chained_steps_total"))


def test_chained_steps_end_where_each_request_does(llama, reference_model, cluster2):
    # Greedy requests decoding in chains: one ends on a stop token, one on its max_tokens, one is
    # aborted mid-stream (its client goes away); each ends on exactly its token and frees everything.
    want = [reference(reference_model(llama), p, max_tokens=30) for p in PROMPTS]
    before = chained_steps(cluster2)
    results: list = [None] * len(PROMPTS)

    def one(i: int) -> None:
        with TandemClient(cluster2.endpoint, timeout_s=120) as client:
            if i == 0:
                results[i] = client.generate(prompt_ids=PROMPTS[i], max_tokens=24, temperature=0.0,
                                             stop_token_ids=[want[0][6]])
            elif i == 1:
                with client.generate_stream(prompt_ids=PROMPTS[i], max_tokens=24, temperature=0.0,
                                            ignore_eos=True) as stream:
                    results[i] = [t for chunk in islice(stream, 5) for t in chunk.token_ids]
            else:
                results[i] = client.generate(prompt_ids=PROMPTS[i], max_tokens=12 + 6 * i, temperature=0.0,
                                             ignore_eos=True)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert chained_steps(cluster2) > before
    first_stop = want[0].index(want[0][6])  # the stop token's first occurrence ends the request
    assert list(results[0].token_ids) == want[0][: first_stop + 1] and results[0].finish_reason == "stop_token"
    assert results[1] == want[1][: len(results[1])] and len(results[1]) >= 5
    for i in (2, 3):
        assert list(results[i].token_ids) == want[i][: 12 + 6 * i] and results[i].finish_reason == "length"
    assert_all_released(cluster2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("preset", ["full", "baseline"])
def test_greedy_on_cuda_matches_transformers(llama, reference_model, preset):
    # Stages on the GPU: inputs copied on the stages' own streams, decode steps from CUDA graphs.
    c = start_cluster(llama, num_stages=2, num_samplers=2, preset=preset, device="cuda")
    try:
        results = run_concurrently(c.endpoint, PROMPTS, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        for prompt, r in zip(PROMPTS, results):
            assert list(r.token_ids) == reference(reference_model(llama), prompt)
        assert_all_released(c)
    finally:
        c.stop()


def test_a_shared_prefix_is_reused_and_output_still_matches(llama, reference_model, cluster2):
    # Block size 4: the second prompt shares the first's first three full blocks (12 tokens).
    first = list(range(20, 47))
    second = first[:12] + [300, 301, 302]
    with TandemClient(cluster2.endpoint, timeout_s=60) as client:
        before = client.server_info()
        got = [client.generate(prompt_ids=p, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True).token_ids
               for p in (first, second)]
        after = client.server_info()
    for prompt, ids in zip((first, second), got):
        assert list(ids) == reference(reference_model(llama), prompt)
    assert after.prefix_cache_hits_total - before.prefix_cache_hits_total >= 12
    assert after.prefix_cache_queries_total - before.prefix_cache_queries_total == len(first) - 1 + len(second) - 1
    assert_all_released(cluster2)


def test_seeded_sampling_is_independent_of_topology(llama, cluster2):
    sampling = dict(max_tokens=8, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True,
                    repetition_penalty=1.1, presence_penalty=0.2)
    together = [r.token_ids for r in run_concurrently(cluster2.endpoint, PROMPTS, **sampling)]
    # one stage that samples in series with the straightforward sampler, and no overlap: the baseline
    alone_cluster = start_cluster(llama, num_stages=1, preset="baseline")
    try:
        with TandemClient(alone_cluster.endpoint, timeout_s=60) as client:
            alone = [client.generate(prompt_ids=p, **sampling).token_ids for p in PROMPTS]
    finally:
        alone_cluster.stop()
    assert [list(t) for t in together] == [list(t) for t in alone]
    other_seed = run_concurrently(cluster2.endpoint, PROMPTS[:1], **{**sampling, "seed": 99})[0].token_ids
    assert list(other_seed) != list(together[0])


def test_abort_and_disconnect_free_everything(cluster2):
    with TandemClient(cluster2.endpoint, timeout_s=60) as client:
        stream = client.generate_stream(prompt_ids=PROMPTS[2], max_tokens=200, ignore_eos=True, temperature=0.0)
        next(iter(stream))
        stream.close()  # client disconnect
        rid = "to-abort"
        aborted: list = []

        def run():
            try:
                aborted.append(client.generate(prompt_ids=PROMPTS[0], max_tokens=200, ignore_eos=True, request_id=rid))
            except client_errors.ClientError as e:
                aborted.append(e)

        t = threading.Thread(target=run)
        t.start()
        deadline = time.monotonic() + 10
        while True:
            try:
                client.abort(rid)
                break
            except client_errors.NotFoundError:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        t.join(30)
        assert aborted and getattr(aborted[0], "finish_reason", None) == "aborted"
        for _ in range(6):
            client.generate(prompt_ids=PROMPTS[1], max_tokens=5)
    assert_all_released(cluster2)


def test_concurrent_requests_with_one_id_run_exactly_once(llama, reference_model, cluster2):
    """Ten Generates with the same request id at once: one runs to its full output, every other
    is refused ALREADY_EXISTS at once, and the refusals do not abort the one that runs."""
    num_calls, rounds = 10, 3
    want = reference(reference_model(llama), PROMPTS[2], 24)
    for r in range(rounds):
        barrier, outcomes = threading.Barrier(num_calls), [None] * num_calls

        def one(i: int) -> None:
            with TandemClient(cluster2.endpoint, timeout_s=60) as client:
                barrier.wait()
                try:
                    outcomes[i] = client.generate(prompt_ids=PROMPTS[2], max_tokens=24, ignore_eos=True,
                                                  temperature=0.0, request_id=f"same-id-{r}")
                except client_errors.ClientError as e:
                    outcomes[i] = e

        threads = [threading.Thread(target=one, args=(i,)) for i in range(num_calls)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        finished = [o for o in outcomes if not isinstance(o, Exception)]
        refused = [o for o in outcomes if isinstance(o, client_errors.AlreadyExistsError)]
        assert len(finished) == 1 and len(refused) == num_calls - 1, outcomes
        assert finished[0].token_ids == want and finished[0].finish_reason == "length"
    # The id is free again once its request ended.
    with TandemClient(cluster2.endpoint, timeout_s=60) as client:
        assert client.generate(prompt_ids=PROMPTS[1], max_tokens=3, request_id="same-id-0").token_ids
    assert_all_released(cluster2)


@pytest.mark.parametrize("with_kv_store", [True, False], ids=["swap", "recompute"])
def test_preemption_gives_identical_output(llama, reference_model, with_kv_store):
    prompts = [list(range(10 + i, 22 + i)) for i in range(4)]
    # 14 blocks of 4 tokens cannot hold four sequences of 12 + 24 tokens at once. Temporal phases
    # (on in `full`) would admit them one by one; told that each makes 1 token, they admit all four.
    c = start_cluster(llama, num_stages=2, num_samplers=1, num_blocks=14, with_kv_store=with_kv_store)
    try:
        results = run_concurrently(c.endpoint, prompts, stagger_s=0.0, max_tokens=24, temperature=0.0, ignore_eos=True,
                                   output_len_hint=1)
        for prompt, r in zip(prompts, results):
            assert list(r.token_ids) == reference(reference_model(llama), prompt, 24)
        with TandemClient(c.endpoint) as client:
            info = client.server_info()
        assert info.num_preemptions_total > 0
        assert_all_released(c)
    finally:
        c.stop()


def test_temporal_phases_admit_what_the_memory_projection_allows(llama, reference_model):
    """The same four requests as above, with the server's own prediction (at most max_tokens):
    without a KV store to swap to, temporal phases admit a prompt only while the projected KV peak
    fits the stages' blocks, so none is preempted. (With one, the projection counts its room too
    and a sequence that outgrows the blocks is swapped out and back: tests/test_td_pipe.py.)"""
    prompts = [list(range(10 + i, 22 + i)) for i in range(4)]
    c = start_cluster(llama, num_stages=2, num_samplers=1, num_blocks=14, preset="full", with_kv_store=False)
    try:
        results = run_concurrently(c.endpoint, prompts, stagger_s=0.0, max_tokens=24, temperature=0.0, ignore_eos=True)
        for prompt, r in zip(prompts, results):
            assert list(r.token_ids) == reference(reference_model(llama), prompt, 24)
        with TandemClient(c.endpoint) as client:
            assert client.server_info().num_preemptions_total == 0
        assert_all_released(c)
    finally:
        c.stop()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prompt_ids=[]), "empty"),
        (dict(prompt_ids=list(range(1, 300))), "context"),
        (dict(prompt_ids=[1, 2], max_tokens=0), "max_tokens"),
        (dict(prompt_ids=[1, 2], max_tokens=10_000), "max_tokens"),
        (dict(prompt_ids=[1, 2], top_p=0.0), "top_p"),
        (dict(prompt_ids=[1, 2], top_p=1.5), "top_p"),
        (dict(prompt_ids=[1, 2], temperature=-1.0), "temperature"),
        (dict(prompt_ids=[1, 331]), "vocabulary"),
        (dict(prompt_ids=[-1, 2]), "vocabulary"),
    ],
)
def test_bad_requests_are_refused_and_serving_goes_on(cluster2, kwargs, match):
    with TandemClient(cluster2.endpoint, timeout_s=30) as client:
        with pytest.raises(client_errors.InvalidArgumentError, match=match):
            client.generate(**kwargs)
        assert len(client.generate(prompt_ids=[5, 6], max_tokens=3, ignore_eos=True).token_ids) == 3


def test_any_int64_seed_is_served_and_reproducible(cluster2):
    """A negative seed once left its request waiting forever (the samplers' seeds are uint64)."""
    with TandemClient(cluster2.endpoint, timeout_s=60) as client:
        for seed in (-1, -(2**63), 2**63 - 1):
            runs = [client.generate(prompt_ids=PROMPTS[0], max_tokens=8, ignore_eos=True, temperature=1.0,
                                    seed=seed) for _ in range(2)]
            assert runs[0].token_ids == runs[1].token_ids and len(runs[0].token_ids) == 8
    assert_all_released(cluster2)


def test_abort_of_unknown_request_is_not_found(cluster2):
    with TandemClient(cluster2.endpoint) as client:
        with pytest.raises(client_errors.NotFoundError, match="no-such-request"):
            client.abort("no-such-request")


def test_malformed_tensors_on_internal_streams(cluster2):
    bad = tensor_pb2.Tensor(dtype="float32", shape=[2, 72], data=b"\0" * 10)
    with grpc.insecure_channel(cluster2.stages[1]) as ch:
        stub = stage_worker_pb2_grpc.StageWorkerStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Activations(iter([stage_worker_pb2.ActivationFrame(step_id=10**9, hidden=bad)]), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bytes" in e.value.details()
    with grpc.insecure_channel(cluster2.samplers[0]) as ch:
        stub = cpu_sampler_pb2_grpc.CpuSamplerStub(ch)
        frame = cpu_sampler_pb2.LogitsFrame(step_id=10**9, request_ids=["x"], sample_indices=[0],
                                            logits=tensor_pb2.Tensor(dtype="complex64", shape=[1, 3], data=b""))
        with pytest.raises(grpc.RpcError) as e:
            stub.Logits(iter([frame]), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "complex64" in e.value.details()
    with TandemClient(cluster2.endpoint, timeout_s=30) as client:
        assert len(client.generate(prompt_ids=[5, 6], max_tokens=3, ignore_eos=True).token_ids) == 3


def test_text_in_text_out(cluster2):
    with TandemClient(cluster2.endpoint, timeout_s=30) as client:
        ids = client.tokenize("The quick brown fox")
        assert client.detokenize(ids) == "The quick brown fox"
        streamed = "".join(c.text for c in client.generate_stream("The quick brown fox", max_tokens=6, temperature=0.0))
        whole = client.generate("The quick brown fox", max_tokens=6, temperature=0.0)
        assert streamed == whole.text
        assert whole.text == client.detokenize(list(whole.token_ids))


def test_stop_strings_and_stop_tokens(cluster2):
    with TandemClient(cluster2.endpoint, timeout_s=30) as client:
        free = client.generate(prompt_ids=PROMPTS[0], max_tokens=12, temperature=0.0, ignore_eos=True)
        stop_token = free.token_ids[4]
        r = client.generate(prompt_ids=PROMPTS[0], max_tokens=12, temperature=0.0, stop_token_ids=[stop_token])
        assert list(r.token_ids) == list(free.token_ids[: list(free.token_ids).index(stop_token) + 1])
        assert r.finish_reason == "stop_token"
        text = free.text
        if len(text) >= 4:
            needle = text[len(text) // 2 : len(text) // 2 + 2]
            r = client.generate(prompt_ids=PROMPTS[0], max_tokens=12, temperature=0.0, stop=[needle], ignore_eos=True)
            assert r.finish_reason == "stop" and r.text == text[: text.index(needle)]


def test_queue_full_is_resource_exhausted(llama):
    c = start_cluster(llama, num_stages=1, num_samplers=1, max_queue=1, max_num_seqs=1, num_blocks=64)
    try:
        errors, lock = [], threading.Lock()

        def one():
            try:
                with TandemClient(c.endpoint, timeout_s=60) as client:
                    client.generate(prompt_ids=PROMPTS[2], max_tokens=30, ignore_eos=True)
            except client_errors.ResourceExhaustedError as e:
                with lock:
                    errors.append(e)

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors and "queue is full" in str(errors[0])
        assert_all_released(c)
    finally:
        c.stop()
