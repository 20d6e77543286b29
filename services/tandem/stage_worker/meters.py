"""A stage's `tandem:stage_*` metrics (docs/metrics.md), labelled with its index.

The runner reports each executed plan (`executed`); KV block usage and the bytes each outgoing
stream sent are read when the metrics are scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from tandem.core.metrics import PREFIX, Metrics
from tandem.stage_worker.executor import StageExecutor
from tandem.stage_worker.outputs import Traffic

HOP_COUNTERS = {  # Traffic field -> help text of `tandem:stage_{field}_out_total`
    "frames": "Frames sent on the hop's stream (a structure-aware stream's header included)",
    "wire_bytes": "Serialized bytes of the frames sent on the hop's stream",
    "tensor_bytes": "Bytes of the tensors the hop's frames carried (elements times element size)",
    "shm_bytes": "Tensor bytes handed over through a shared-memory ring instead of the stream",
}


class StageMeters:
    def __init__(self, metrics: Metrics, stage_index: int, executor: Callable[[], StageExecutor | None],
                 hops: Callable[[], dict[str, Traffic]]):
        labels = {"stage": str(stage_index)}
        self.steps = metrics.counter("stage_steps", "Steps with a forward pass", ["stage"]).labels(**labels)
        self.step_seconds = metrics.histogram(
            "stage_step_seconds", "Time of one step with a forward pass, without the wait for its activations",
            ["stage"]).labels(**labels)
        self.busy_seconds = metrics.counter(
            "stage_busy_seconds", "Time spent on steps, without the waits for activations", ["stage"]).labels(**labels)
        self.idle_seconds = metrics.counter(
            "stage_idle_seconds", "Time since ready not spent on steps (the bubble): waiting for a plan or for "
            "the previous stage's activations", ["stage"]).labels(**labels)
        self.forward_seconds = metrics.counter(
            "stage_forward_seconds", "Time in forward passes", ["stage"]).labels(**labels)
        metrics.gauge("stage_kv_blocks_used", "KV cache blocks held by live sequences", ["stage"]).labels(
            **labels).set_function(lambda: _blocks_used(executor()))
        metrics.gauge("stage_kv_blocks_capacity", "KV cache blocks on this stage", ["stage"]).labels(
            **labels).set_function(lambda: ex.config.num_blocks if (ex := executor()) else 0)
        metrics.registry.register(_HopCollector(labels["stage"], hops))

    def executed(self, busy_ns: int, idle_ns: int, forward_ns: int) -> None:
        """One plan executed: `forward_ns` 0 when it ran no forward pass (housekeeping, an error)."""
        self.busy_seconds.inc(busy_ns / 1e9)
        self.idle_seconds.inc(idle_ns / 1e9)
        if forward_ns:
            self.steps.inc()
            self.step_seconds.observe(busy_ns / 1e9)
            self.forward_seconds.inc(forward_ns / 1e9)


def _blocks_used(executor: StageExecutor | None) -> int:
    if executor is None:
        return 0
    tables = list(executor.blocks_of.values())  # a snapshot: the executor thread changes the dict
    return len({block for table in tables for block in table})


class _HopCollector(Collector):
    """`tandem:stage_*_out_total{stage, hop}`: what each outgoing stream (a hop) sent so far."""

    def __init__(self, stage: str, hops: Callable[[], dict[str, Traffic]]):
        self._stage, self._hops = stage, hops

    def collect(self) -> Iterable[CounterMetricFamily]:
        families = {field: CounterMetricFamily(f"{PREFIX}stage_{field}_out", text, labels=["stage", "hop"])
                    for field, text in HOP_COUNTERS.items()}
        for hop, traffic in self._hops().items():
            for field, family in families.items():
                family.add_metric([self._stage, hop], getattr(traffic, field))
        return families.values()
