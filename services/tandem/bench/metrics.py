"""Reading the stages' and samplers' cumulative counters, before and after a measured run.

Services only ever count up (since they started), so a run's share is the difference of two
reads; warm-up and anything else that ran before the first read drops out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc

# A service that does not fill a counter reports 0 (compute_cpu_ns_total and sample_cpu_ns_total
# are newer than the others; the bound falls back to wall-clock compute without them).
STAGE_COUNTERS = ("uptime_ns", "busy_ns_total", "wait_ns_total", "compute_ns_total", "compute_cpu_ns_total",
                  "wire_bytes_out_total", "shm_bytes_out_total", "tensor_bytes_out_total", "frames_out_total",
                  "num_steps_total")
SAMPLER_COUNTERS = ("num_frames_total", "num_rows_total", "sample_ns_total", "sample_cpu_ns_total",
                    "wire_bytes_in_total", "shm_bytes_in_total", "tensor_bytes_in_total")


@dataclass(frozen=True)
class Counters:
    """One read (or the difference of two) of every stage's and sampler's counters, in order."""

    stages: tuple[dict[str, int], ...]
    samplers: tuple[dict[str, int], ...]

    def minus(self, earlier: Counters) -> Counters:
        """What was counted between `earlier` and this read."""
        return Counters(tuple(_sub(a, b) for a, b in zip(self.stages, earlier.stages, strict=True)),
                        tuple(_sub(a, b) for a, b in zip(self.samplers, earlier.samplers, strict=True)))


def _sub(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


class ServiceProbe:
    """Reads counters from the services at the given addresses over gRPC."""

    def __init__(self, stages: Sequence[str], samplers: Sequence[str], timeout_s: float = 10.0):
        from tandem.v1 import cpu_sampler_pb2_grpc, stage_worker_pb2_grpc

        self.stage_addresses, self.sampler_addresses = list(stages), list(samplers)
        self.timeout_s = timeout_s
        self._channels = [grpc.insecure_channel(a) for a in (*stages, *samplers)]
        self._stages = [stage_worker_pb2_grpc.StageWorkerStub(c) for c in self._channels[:len(stages)]]
        self._samplers = [cpu_sampler_pb2_grpc.CpuSamplerStub(c) for c in self._channels[len(stages):]]

    def read(self) -> Counters:
        from tandem.v1 import cpu_sampler_pb2, stage_worker_pb2

        stages = tuple(_fields(s.GetStageInfo(stage_worker_pb2.GetStageInfoRequest(), timeout=self.timeout_s),
                               STAGE_COUNTERS) for s in self._stages)
        samplers = tuple(_fields(s.GetSamplerInfo(cpu_sampler_pb2.GetSamplerInfoRequest(), timeout=self.timeout_s),
                                 SAMPLER_COUNTERS) for s in self._samplers)
        return Counters(stages, samplers)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> ServiceProbe:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _fields(message: object, names: Sequence[str]) -> dict[str, int]:
    return {name: int(getattr(message, name)) for name in names}
