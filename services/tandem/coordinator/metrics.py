"""The coordinator's Prometheus metrics, under the names vLLM exports (prefixed `tandem:`).

Two sources, so the engine's loop does no metrics work:
- what a request's coroutine on the front sees (`RequestStats`): its tokens as they reach the client,
  its times and its finish reason: counters and histograms, updated there;
- what the loop publishes anyway (`Snapshot`) and what the service probe last heard from the
  other services: gauges and cumulative counts, read only when the endpoint is scraped.

With `vllm_names` every coordinator metric is served a second time under `vllm:` with the same
samples (and inter_token_latency_seconds also as vLLM's older time_per_output_token_seconds),
so dashboards, KEDA ScaledObjects and llm-d's scheduler written for vLLM read it unchanged.
Labels follow vLLM's: `model_name` and `engine` ("0": one scheduler) on every metric.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tandem.coordinator.front import TextStream
from tandem.coordinator.gate import Snapshot
from tandem.coordinator.info import Report
from tandem.coordinator.requests import Request
from tandem.core.metrics import PREFIX, Metrics
from tandem.v1 import common_pb2

VLLM_PREFIX = "vllm:"
LABELS = ("model_name", "engine")
# vLLM's buckets (vllm/v1/metrics/loggers.py), so that quantiles from either server compare
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                  40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                 80.0)
REQUEST_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                     480.0, 960.0, 1920.0, 7680.0)
# vLLM's `finished_reason` label values
FINISHED_REASONS = {
    common_pb2.FINISH_REASON_STOP_TOKEN: "stop", common_pb2.FINISH_REASON_STOP_SEQUENCE: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length", common_pb2.FINISH_REASON_ABORTED: "abort",
    common_pb2.FINISH_REASON_TIME_LIMIT: "abort", common_pb2.FINISH_REASON_ERROR: "error",
}


def token_buckets(max_model_len: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to max_model_len, as vLLM's token-count histograms."""
    buckets: list[float] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_model_len:
                return buckets
            buckets.append(value)
        exponent += 1


class CoordinatorMetrics:
    """The coordinator's metrics in `metrics`' registry: the request metrics, counted through
    `start(request)`, and the collector that reads the engine's state at scrape time."""

    def __init__(self, metrics: Metrics, model_name: str, max_model_len: int, num_blocks: int,
                 snapshot: Callable[[], Snapshot], report: Callable[[], Report], *, block_bytes: int = 0,
                 num_host_blocks: int = 0, vllm_names: bool = False):
        """`snapshot` and `report` give the engine's last Snapshot and the probe's last Report;
        `block_bytes` and `num_host_blocks` (0: no KV store) turn its bytes into KV blocks."""
        self.labels = (model_name, "0")
        own: list[Collector] = []

        def histogram(name: str, text: str, buckets: Sequence[float]) -> Histogram:
            family = metrics.histogram(name, text, LABELS, buckets)
            own.append(family)
            return family.labels(*self.labels)

        def counter(name: str, text: str) -> Counter:
            family = metrics.counter(name, text, LABELS)
            own.append(family)
            return family.labels(*self.labels)

        tokens = token_buckets(max_model_len)
        self.ttft = histogram("time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TTFT_BUCKETS_S)
        self.itl = histogram("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             ITL_BUCKETS_S)
        self.e2e = histogram("e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             REQUEST_BUCKETS_S)
        self.queue_time = histogram("request_queue_time_seconds",
                                    "Histogram of time spent in WAITING phase for request.", REQUEST_BUCKETS_S)
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Number of prefill tokens processed.", tokens)
        self.request_generation_tokens = histogram("request_generation_tokens",
                                                   "Number of generation tokens processed.", tokens)
        self.prompt_tokens = counter("prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Number of generation tokens processed.")
        self.success = metrics.counter("request_success", "Count of successfully processed requests.",
                                       (*LABELS, "finished_reason"))
        own.append(self.success)
        for reason in sorted(set(FINISHED_REASONS.values())):  # every reason served from the start, at 0
            self.success.labels(*self.labels, reason)
        own.append(StateCollector(self.labels, num_blocks, block_bytes, num_host_blocks, snapshot, report))
        metrics.registry.register(own[-1])
        if vllm_names:
            metrics.registry.register(VllmNames(own))

    def start(self, request: Request) -> RequestStats:
        """The stats of one admitted request, kept by its coroutine on the front."""
        return RequestStats(self, request)


class RequestStats:
    """One request's share of the metrics, counted in its coroutine on the front as its tokens go out."""

    def __init__(self, metrics: CoordinatorMetrics, request: Request):
        self._m, self._request = metrics, request
        self._last_token_time: float | None = None
        self._is_ended = False

    def tokens(self, num_tokens: int) -> None:
        """`num_tokens` more tokens reached the client now: the first counts the prompt and the
        time to first token, the others each an inter-token latency (a batch shares out its gap)."""
        if num_tokens == 0:
            return
        m, now = self._m, time.monotonic()
        m.generation_tokens.inc(num_tokens)
        if self._last_token_time is None:
            m.prompt_tokens.inc(len(self._request.prompt_ids))
            m.ttft.observe(now - self._request.arrival_time)
            num_gaps, gap = num_tokens - 1, 0.0
        else:
            num_gaps, gap = num_tokens, (now - self._last_token_time) / num_tokens
        for _ in range(num_gaps):
            m.itl.observe(gap)
        self._last_token_time = now

    def end(self, text: TextStream) -> None:
        """The request ended, or its client left (an abort); only the first call counts."""
        if self._is_ended:
            return
        self._is_ended, m, request = True, self._m, self._request
        m.e2e.observe((text.finish_time or time.monotonic()) - request.arrival_time)
        if request.scheduled_time is not None:
            m.queue_time.observe(request.scheduled_time - request.arrival_time)
        m.request_prompt_tokens.observe(len(request.prompt_ids))
        m.request_generation_tokens.observe(len(text.output_ids))
        m.success.labels(*m.labels, FINISHED_REASONS.get(text.finish_reason, "abort")).inc()


class StateCollector(Collector):
    """The engine's state, read at scrape time: its last Snapshot and the probe's last Report."""

    def __init__(self, labels: tuple[str, str], num_blocks: int, block_bytes: int, num_host_blocks: int,
                 snapshot: Callable[[], Snapshot], report: Callable[[], Report]):
        self.labels, self.num_blocks = labels, num_blocks
        self.block_bytes, self.num_host_blocks = block_bytes, num_host_blocks
        self.snapshot, self.report = snapshot, report

    def collect(self) -> Iterator[Metric]:
        s, r, values = self.snapshot(), self.report(), list(self.labels)

        def family(kind: type, name: str, text: str, value: float) -> Metric:
            f = kind(PREFIX + name, text, labels=LABELS)
            f.add_metric(values, value)
            return f

        yield family(GaugeMetricFamily, "num_requests_running", "Number of requests in model execution batches.",
                     s.num_running)
        yield family(GaugeMetricFamily, "num_requests_waiting", "Number of requests waiting to be processed.",
                     s.num_waiting)
        yield family(GaugeMetricFamily, "kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                     s.num_blocks_used / self.num_blocks)
        yield family(CounterMetricFamily, "prefix_cache_queries",
                     "Prefix cache queries, in terms of number of queried tokens.", s.prefix_cache_queries)
        yield family(CounterMetricFamily, "prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                     s.prefix_cache_hits)
        yield family(CounterMetricFamily, "num_preemptions", "Cumulative number of preemption from the engine.",
                     s.num_preemptions)
        if s.phase:
            switches = CounterMetricFamily(PREFIX + "phase_switches", "Temporal phases: switches of the whole "
                                           "pipeline into each phase.", labels=(*LABELS, "phase"))
            phase = GaugeMetricFamily(PREFIX + "phase", "Temporal phases: 1 for the phase the pipeline is in.",
                                      labels=(*LABELS, "phase"))
            for name, count in zip(("prefill", "decode"), s.phase_switches):
                switches.add_metric([*values, name], count)
                phase.add_metric([*values, name], float(s.phase == name))
            yield switches
            yield phase
        if s.num_chained_steps:
            yield family(CounterMetricFamily, "chained_steps", "Decode chaining: steps sent before the tokens they "
                         "feed were sampled, which stage 0 took from the last stage.", s.num_chained_steps)
        yield family(GaugeMetricFamily, "sampler_pool_size",
                     "Sampler replicas up (taking sequences), the last stage's own included when it hosts one.",
                     len(s.samplers))
        sequences = GaugeMetricFamily(PREFIX + "sampler_pool_sequences",
                                      "Sequences each sampler replica holds, as it last reported.",
                                      labels=(*LABELS, "sampler"))
        for address in s.samplers:
            sequences.add_metric([*values, address], r.sampler_sequences.get(address, 0))
        yield sequences
        if self.num_host_blocks:
            yield family(GaugeMetricFamily, "kv_store_blocks_used",
                         "KV blocks the KV store holds for swapped-out sequences, as it last reported.",
                         r.kv_store_used_bytes // self.block_bytes)
            yield family(GaugeMetricFamily, "kv_store_blocks_capacity", "KV blocks the KV store can hold.",
                         self.num_host_blocks)


class VllmNames(Collector):
    """The samples of `collectors` again, under `vllm:` instead of `tandem:`."""

    ALIASES = {"inter_token_latency_seconds": "time_per_output_token_seconds"}  # vLLM's older name, same samples

    def __init__(self, collectors: list[Collector]):
        self.collectors = collectors

    def collect(self) -> Iterator[Metric]:
        for collector in self.collectors:
            for family in collector.collect():
                name = family.name.removeprefix(PREFIX)
                yield self._renamed(family, name)
                if name in self.ALIASES:
                    yield self._renamed(family, self.ALIASES[name], name)

    @staticmethod
    def _renamed(family: Metric, name: str, old: str = "") -> Metric:
        copy = Metric(VLLM_PREFIX + name, family.documentation, family.type, family.unit)
        old_prefix = PREFIX + (old or name)
        copy.samples = [s._replace(name=VLLM_PREFIX + name + s.name.removeprefix(old_prefix)) for s in family.samples]
        return copy
