"""Prometheus metrics of stages and samplers: after a known workload, scraped over HTTP and parsed
with prometheus_client's own parser, the counters equal what was served."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster import start_cluster
from tandem.client import TandemClient
from tandem.core.errors import ConfigError
from tandem.core.metrics import METRICS_OFF, Metrics
from tandem.cpu_sampler.config import SamplerConfig
from tandem.stage_worker.config import StageWorkerConfig
from tandem.v1 import cpu_sampler_pb2, cpu_sampler_pb2_grpc, stage_worker_pb2, stage_worker_pb2_grpc

PROMPTS = [[5, 7, 9, 11, 13, 200, 3], [100, 4, 40], list(range(20, 47))]
MAX_TOKENS = 6
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(metrics: Metrics) -> Samples:
    """Every sample the metrics endpoint serves, by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics.port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def hops(samples: Samples, name: str, stage: str) -> dict[str, float]:
    return {dict(labels)["hop"]: v for (n, labels), v in samples.items() if n == name and dict(labels)["stage"] == stage}


def generate(endpoint: str) -> int:
    """Run PROMPTS one after another, greedy, every other one asking for logprobs (so that in
    preset full some rows are sampled on the last stage and some on the replicas); the number
    of tokens generated."""
    with TandemClient(endpoint, timeout_s=120) as client:
        results = [client.generate(prompt_ids=p, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                                   logprobs=0 if i % 2 else None) for i, p in enumerate(PROMPTS)]
    return sum(len(r.token_ids) for r in results)


def stage_info(address: str) -> stage_worker_pb2.GetStageInfoResponse:
    with grpc.insecure_channel(address) as channel:
        return stage_worker_pb2_grpc.StageWorkerStub(channel).GetStageInfo(stage_worker_pb2.GetStageInfoRequest(),
                                                                            timeout=10)


def sampler_info(address: str) -> cpu_sampler_pb2.GetSamplerInfoResponse:
    with grpc.insecure_channel(address) as channel:
        return cpu_sampler_pb2_grpc.CpuSamplerStub(channel).GetSamplerInfo(cpu_sampler_pb2.GetSamplerInfoRequest(),
                                                                           timeout=10)


def settled_stage(cluster, i: int) -> tuple[Samples, stage_worker_pb2.GetStageInfoResponse]:
    """A scrape of stage i taken once the stage is idle: its last steps (housekeeping
    included) may still be finishing when the client has its tokens."""
    deadline, stage = time.monotonic() + 10, str(i)
    while True:
        info, samples, after = stage_info(cluster.stages[i]), scrape(cluster.stage_metrics[i]), stage_info(cluster.stages[i])
        if ((info.busy_ns_total, info.frames_out_total) == (after.busy_ns_total, after.frames_out_total) and
                value(samples, "tandem:stage_steps_total", stage=stage) == info.num_steps_total and
                abs(value(samples, "tandem:stage_busy_seconds_total", stage=stage) * 1e9 - info.busy_ns_total) < 1e3 and
                value(samples, "tandem:stage_kv_blocks_used", stage=stage) == 0):
            return samples, info
        assert time.monotonic() < deadline, f"stage {i}: metrics never settled"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def llama(checkpoint):
    return checkpoint("llama")


def test_stage_and_sampler_metrics_equal_what_was_served(llama):
    c = start_cluster(llama, num_stages=2, num_samplers=2, num_blocks=64)
    try:
        num_tokens = generate(c.endpoint)
        assert num_tokens == len(PROMPTS) * MAX_TOKENS
        for i in range(2):
            samples, info = settled_stage(c, i)
            stage = str(i)
            assert info.num_steps_total > 0
            assert value(samples, "tandem:stage_step_seconds_count", stage=stage) == info.num_steps_total
            assert value(samples, "tandem:stage_step_seconds_bucket", stage=stage, le="+Inf") == info.num_steps_total
            assert value(samples, "tandem:stage_forward_seconds_total", stage=stage) * 1e9 == pytest.approx(
                info.compute_ns_total, abs=1e3)
            assert info.compute_ns_total > 0
            assert value(samples, "tandem:stage_idle_seconds_total", stage=stage) > 0
            assert value(samples, "tandem:stage_kv_blocks_capacity", stage=stage) == 64
            frames = hops(samples, "tandem:stage_frames_out_total", stage)
            assert sum(frames.values()) == info.frames_out_total
            assert sum(hops(samples, "tandem:stage_wire_bytes_out_total", stage).values()) == info.wire_bytes_out_total
            assert sum(hops(samples, "tandem:stage_tensor_bytes_out_total", stage).values()) == info.tensor_bytes_out_total
            assert sum(hops(samples, "tandem:stage_shm_bytes_out_total", stage).values()) == info.shm_bytes_out_total
            if i == 0:  # one activations frame per step, after the stream's header
                assert frames == {f"activations->{c.stages[1]}": info.num_steps_total + 1}
            else:
                assert set(frames) <= {f"logits->{address}" for address in c.samplers}
        # the argmax rows were sampled by the sampler the last stage hosts, the others by the replicas
        on_stage = value(samples, "tandem:sampler_rows_total", sampler="stage-1")
        rows = 0
        for i, (address, metrics) in enumerate(zip(c.samplers, c.sampler_metrics)):
            samples, info, name = scrape(metrics), sampler_info(address), f"sampler-{i}"
            rows += value(samples, "tandem:sampler_rows_total", sampler=name)
            assert value(samples, "tandem:sampler_rows_total", sampler=name) == info.num_rows_total
            assert value(samples, "tandem:sampler_sample_seconds_count", sampler=name) == info.num_frames_total
            assert value(samples, "tandem:sampler_num_sequences", sampler=name) == 0
            assert value(samples, "tandem:sampler_num_queued_batches", sampler=name) == 0
            assert value(samples, "tandem:sampler_num_planned_steps", sampler=name) == 0
        assert 0 < on_stage < num_tokens and on_stage + rows == num_tokens
    finally:
        ports = [m.port for m in c.stage_metrics + c.sampler_metrics]
        c.stop()
    for port in ports:  # every metrics server stopped with its service
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_baseline_last_stage_serves_its_samplers_metrics_too(llama):
    c = start_cluster(llama, num_stages=2, preset="baseline")
    try:
        num_tokens = generate(c.endpoint)
        samples, info = settled_stage(c, 1)
        assert value(samples, "tandem:sampler_rows_total", sampler="stage-1") == num_tokens
        assert value(samples, "tandem:sampler_sample_seconds_count", sampler="stage-1") == info.num_steps_total
        assert hops(samples, "tandem:stage_frames_out_total", "1") == {}  # the logits never leave the stage
    finally:
        c.stop()


def test_metrics_port_off_and_out_of_range():
    metrics = Metrics()
    metrics.serve("127.0.0.1", METRICS_OFF)
    assert metrics.port == 0
    metrics.stop()
    for config in (SamplerConfig(metrics_port=-2), StageWorkerConfig(model="m", metrics_port=70000)):
        with pytest.raises(ConfigError, match="metrics_port"):
            config.validate()
