"""Prometheus metrics of the coordinator and the KV store: after a known workload, scraped over
HTTP and parsed with prometheus_client's own parser, the counters equal what was served, the
histograms counted every request, and the `vllm:` names appear exactly when asked for."""

from __future__ import annotations

import concurrent.futures as cf
import time

import pytest

from cluster import start_cluster
from tandem.client import GenerateResult, TandemClient
from tandem.client.errors import NotFoundError
from tandem.coordinator.config import CoordinatorConfig
from tandem.coordinator.metrics import token_buckets
from tandem.core.errors import ConfigError
from tandem.kv_store.config import KvStoreConfig
from test_metrics import Samples, scrape, value

PROMPTS = [[5, 7, 9, 11, 13, 200, 3], [100, 4, 40], list(range(20, 47))]
MAX_TOKENS = 6
MODEL = {"engine": "0"}  # and model_name: the checkpoint directory's name


def run_workload(endpoint: str) -> list[tuple[list[int], GenerateResult]]:
    """PROMPTS to their length limit, the first again stopped by its own third token, and the
    second again aborted at once: each prompt and its result."""
    with TandemClient(endpoint, timeout_s=120) as client:
        results = [client.generate(prompt_ids=p, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
                   for p in PROMPTS]
        assert {r.finish_reason for r in results} == {"length"}
        stop_id = results[0].token_ids[2]
        stopped = client.generate(prompt_ids=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                                  stop_token_ids=[stop_id])
        assert len(stopped.token_ids) == results[0].token_ids.index(stop_id) + 1
        with client.generate_stream(prompt_ids=PROMPTS[1], max_tokens=250, temperature=0.0, ignore_eos=True,
                                    request_id="to-abort") as stream:
            while True:
                try:
                    client.abort("to-abort")
                    break
                except NotFoundError:  # not submitted yet
                    time.sleep(0.001)
            aborted = stream.wait()
        assert aborted.finish_reason == "aborted" and len(aborted.token_ids) < 250
    return [*zip(PROMPTS, results), (PROMPTS[0], stopped), (PROMPTS[1], aborted)]


def settled(cluster) -> Samples:
    """A scrape taken once the engine has published that nothing runs."""
    deadline = time.monotonic() + 10
    while True:
        samples = scrape(cluster.coordinator_metrics)
        labels = {**MODEL, "model_name": model_name(samples)}
        if value(samples, "tandem:num_requests_running", **labels) == 0:
            return samples
        assert time.monotonic() < deadline, "the engine never published an idle snapshot"
        time.sleep(0.05)


def model_name(samples: Samples) -> str:
    return next(dict(labels)["model_name"] for name, labels in samples if name == "tandem:num_requests_running")


@pytest.fixture(scope="module")
def llama(checkpoint):
    return checkpoint("llama")


@pytest.mark.parametrize("vllm_names", [False, True])
def test_coordinator_metrics_equal_what_was_served(llama, vllm_names):
    c = start_cluster(llama, num_stages=2, num_samplers=2, num_blocks=64, metrics_vllm_names=vllm_names)
    try:
        served = run_workload(c.endpoint)
        samples = settled(c)
        labels = {**MODEL, "model_name": llama.name}
        num_requests = len(served)
        num_started = sum(1 for _, r in served if r.token_ids)  # the aborted one may have no token
        num_prompt = sum(len(p) for p, r in served if r.token_ids)  # counted at the first token
        num_generated = sum(len(r.token_ids) for _, r in served)
        for prefix in ("tandem:", "vllm:") if vllm_names else ("tandem:",):
            def v(name: str, **more: str) -> float:
                return value(samples, prefix + name, **labels, **more)

            assert v("prompt_tokens_total") == num_prompt
            assert v("generation_tokens_total") == num_generated
            assert v("request_success_total", finished_reason="length") == len(PROMPTS)
            assert v("request_success_total", finished_reason="stop") == 1
            assert v("request_success_total", finished_reason="abort") == 1
            assert v("request_success_total", finished_reason="error") == 0
            for name in ("e2e_request_latency_seconds", "request_prompt_tokens", "request_generation_tokens"):
                assert v(name + "_count") == num_requests, name
                assert v(name + "_bucket", le="+Inf") == num_requests, name
            assert v("time_to_first_token_seconds_count") == num_started
            assert num_started <= v("request_queue_time_seconds_count") <= num_requests
            assert v("request_prompt_tokens_sum") == sum(len(p) for p, _ in served)
            assert v("request_generation_tokens_sum") == num_generated
            assert v("inter_token_latency_seconds_count") == num_generated - num_started
            assert v("num_requests_running") == 0 and v("num_requests_waiting") == 0
            assert v("kv_cache_usage_perc") == 0  # nothing held; cached prefixes are free to take
            # every prompt but its last token (computed for its logits) is looked up; the fourth
            # request repeats the first's prompt, whose one full block (of 4 tokens) is found
            assert v("prefix_cache_queries_total") >= sum(len(p) - 1 for p, _ in served[:4])
            assert v("prefix_cache_hits_total") == 4  # the aborted one, if looked up, fills no block
            assert v("num_preemptions_total") == 0
            assert v("sampler_pool_size") == 2 + 1  # the replicas and the last stage's own sampler
            assert v("kv_store_blocks_capacity") > 0 and v("kv_store_blocks_used") == 0
        names = {name for name, _ in samples}
        assert ("vllm:time_per_output_token_seconds_count" in names) == vllm_names
        assert any(n.startswith("vllm:") for n in names) == vllm_names
        if vllm_names:
            assert value(samples, "vllm:time_per_output_token_seconds_count", **labels) == num_generated - num_started
        store = scrape(c.kv_store_metrics)
        assert value(store, "tandem:kv_store_capacity_bytes") == 1 << 30
        assert value(store, "tandem:kv_store_used_bytes") == 0
    finally:
        c.stop()


def test_kv_store_blocks_follow_preemptions(llama):
    """With too few KV blocks for the batch, sequences are swapped out to the KV store: the
    preemption counter and the KV store's figures move. (Told that each request makes one token,
    temporal phases admit all four at once, as a scheduler without them would.)"""
    c = start_cluster(llama, num_stages=2, num_samplers=1, num_blocks=12)
    try:
        with TandemClient(c.endpoint, timeout_s=120) as client:
            with cf.ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda p: client.generate(prompt_ids=p, max_tokens=12, temperature=0.0, ignore_eos=True,
                                                        output_len_hint=1), [list(range(10 + i, 26 + i))
                                                                           for i in range(4)]))
        samples = settled(c)
        labels = {**MODEL, "model_name": llama.name}
        assert value(samples, "tandem:num_preemptions_total", **labels) > 0
        assert value(samples, "tandem:request_success_total", finished_reason="length", **labels) == 4
    finally:
        c.stop()


def test_token_buckets_and_config():
    assert token_buckets(100) == [1, 2, 5, 10, 20, 50, 100]
    assert token_buckets(4) == [1, 2]
    for config in (CoordinatorConfig(model="m", stages=("s",), samplers=("x",), metrics_port=-2),):
        with pytest.raises(ConfigError, match="metrics_port"):
            config.validate()
    with pytest.raises(ConfigError, match="metrics_port"):
        KvStoreConfig(metrics_port=65536)
