"""What GetServerInfo reports of the other services, without an RPC per call.

What does not change (each stage's layers, dtype and device, the KV store's capacity) is asked
once at start-up. What does (the blocks each stage holds, the sequences each sampler holds,
the KV store's bytes in use) is asked again in the background every `interval_s`, so the
figures are as each service last reported them, at most about that old.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import grpc

from tandem.core.wire.tls import Credentials, open_channel
from tandem.v1 import (
    cpu_sampler_pb2,
    cpu_sampler_pb2_grpc,
    kv_store_pb2,
    kv_store_pb2_grpc,
)
from tandem.v1 import stage_worker_pb2 as stage_pb
from tandem.v1 import stage_worker_pb2_grpc as stage_grpc

log = logging.getLogger(__name__)
STARTUP_TIMEOUT_S = 10.0
REFRESH_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class StageFacts:
    address: str
    layer_start: int
    layer_end: int
    dtype: str
    device: str


@dataclass(frozen=True)
class Report:
    """The changing figures, as the services last reported them."""

    stage_blocks_used: tuple[int, ...] = ()
    sampler_sequences: Mapping[str, int] = field(default_factory=dict)  # by address
    kv_store_used_bytes: int = 0


class ServiceProbe:
    def __init__(self, stages: list[str], kv_store: str, samplers: Callable[[], tuple[str, ...]],
                 interval_s: float = 1.0, credentials: Credentials | None = None):
        """Ask the stages and the KV store their static facts (blocking: this is start-up);
        `samplers` gives the addresses of the replicas to follow, whenever asked."""
        self._samplers, self.interval_s, self._credentials = samplers, interval_s, credentials
        self._channels: dict[str, grpc.Channel] = {}
        self.stages: list[StageFacts] = []
        for address in stages:
            info = self._stage(address).GetStageInfo(stage_pb.GetStageInfoRequest(), timeout=STARTUP_TIMEOUT_S)
            self.stages.append(StageFacts(address, info.layer_start, info.layer_end, info.dtype, info.device))
        self.kv_store = kv_store
        self.kv_store_capacity_bytes = self._kv_info(STARTUP_TIMEOUT_S).capacity_bytes if kv_store else 0
        self.report = Report(stage_blocks_used=(0,) * len(stages))
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="service-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=REFRESH_TIMEOUT_S * 2)
        for channel in self._channels.values():
            channel.close()

    def _run(self) -> None:
        while not self._stopping.wait(self.interval_s):
            try:
                self.report = self._refresh(self.report)
            except Exception:  # the figures go stale, serving goes on
                log.exception("refreshing the services' figures failed")

    def _refresh(self, last: Report) -> Report:
        blocks = list(last.stage_blocks_used)
        for i, stage in enumerate(self.stages):
            try:
                blocks[i] = self._stage(stage.address).GetStageInfo(
                    stage_pb.GetStageInfoRequest(), timeout=REFRESH_TIMEOUT_S).kv_blocks_used
            except grpc.RpcError:  # down: its last figure stands
                pass
        sequences = {}
        for address in self._samplers():
            stub = cpu_sampler_pb2_grpc.CpuSamplerStub(self._channel(address))
            try:
                sequences[address] = stub.GetSamplerInfo(
                    cpu_sampler_pb2.GetSamplerInfoRequest(), timeout=REFRESH_TIMEOUT_S).num_sequences
            except grpc.RpcError:  # it went away since; the engine is moving its sequences
                continue
        for address in set(self._channels) - {s.address for s in self.stages} - set(sequences) - {self.kv_store}:
            self._channels.pop(address).close()
        used = last.kv_store_used_bytes
        if self.kv_store:
            try:
                used = self._kv_info(REFRESH_TIMEOUT_S).used_bytes
            except grpc.RpcError:
                pass
        return Report(tuple(blocks), sequences, used)

    def _kv_info(self, timeout_s: float) -> kv_store_pb2.GetKvStoreInfoResponse:
        stub = kv_store_pb2_grpc.KvStoreStub(self._channel(self.kv_store))
        return stub.GetKvStoreInfo(kv_store_pb2.GetKvStoreInfoRequest(), timeout=timeout_s)

    def _stage(self, address: str) -> stage_grpc.StageWorkerStub:
        return stage_grpc.StageWorkerStub(self._channel(address))

    def _channel(self, address: str) -> grpc.Channel:
        if address not in self._channels:
            self._channels[address] = open_channel(address, self._credentials)
        return self._channels[address]
