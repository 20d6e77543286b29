"""What the engine's loop talks to: stages, sampler replicas and the KV store, as ports.

A port never blocks its caller. Plans go onto long-lived streams; unary RPCs run in order on
the port's own worker thread, so one slow replica holds up only itself; whatever comes back
arrives as an event in the engine's inbox. Tests replace these with fakes that need no gRPC.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import grpc

from tandem.coordinator.events import (
    Event,
    SamplerDown,
    SamplerUp,
    SequencesAdded,
    StageDown,
    StageUp,
    StepComputed,
    StepFailed,
    TokensSampled,
)
from tandem.core.wire.server import CHANNEL_OPTIONS
from tandem.core.wire.streams import StreamSender
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

Post = Callable[[Event], None]
RPC_TIMEOUT_S = 10.0


class StagePort(Protocol):
    def send(self, plan: stage_pb.StepPlan) -> None:
        """Queue a step plan; a stage that fails the step answers with `StepFailed`, the last
        stage that runs it with `StepComputed`, and a plan stream that breaks posts `StageDown`."""

    def reset(self) -> None:
        """Start a new plan stream: the stage drops the plans of the old one it has not run."""

    def watch(self) -> None:
        """Post `StageUp` once the stage answers again (after a `StageDown`)."""

    def close(self) -> None: ...


class SamplerPort(Protocol):
    address: str

    def start(self) -> None:
        """Follow the replica's results: `SamplerUp` once confirmed, then `TokensSampled` for
        each batch, and `SamplerDown` if the stream breaks."""

    def add(self, sequences: list[cpu_sampler_pb2.SamplerSequence]) -> None:
        """Hand the replica these sequences; answered by `SequencesAdded`."""

    def release(self, request_ids: list[str]) -> None:
        """The replica may forget these sequences (after whatever was sent to it before)."""

    def send_plan(self, plan: cpu_sampler_pb2.SamplePlan) -> None:
        """Queue the replica's rows of one step, ahead of the step's logits."""

    def reconnect(self) -> None:
        """Subscribe to the replica's results anew: a replica taken out of the pool for a failed
        call (paused, overloaded) comes back with `SamplerUp` once it confirms the subscription."""

    def close(self) -> None: ...


class KvStorePort(Protocol):
    def free(self, request_ids: list[str]) -> None:
        """The KV store may drop the blocks of these swapped-out sequences."""

    def close(self) -> None: ...


class _Worker:
    """A channel plus one thread that makes its unary calls in order."""

    def __init__(self, address: str, credentials: Credentials | None):
        self.address = address
        self.channel = open_channel(address, credentials, CHANNEL_OPTIONS)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"rpc->{address}")

    def call(self, fn: Callable[[], None]) -> None:
        self._executor.submit(self._logged, fn)

    def close(self, then: Callable[[], None] | None = None) -> None:
        """Close after the calls queued so far (and `then`); returns at once."""

        def close() -> None:
            if then is not None:
                then()
            self.channel.close()

        self.call(close)
        self._executor.shutdown(wait=False)

    def _logged(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except grpc.RpcError as e:  # the peer is gone; its state went with it
            log.warning("call to %s failed: %s %s", self.address, e.code().name, e.details())
        except Exception:  # a worker thread must outlive any one call
            log.exception("call to %s failed", self.address)


class GrpcStage:
    def __init__(self, index: int, address: str, post: Post, probe_interval_s: float = 0.5,
                 credentials: Credentials | None = None, *, is_last: bool):
        self.index, self._post, self._probe_interval_s, self.is_last = index, post, probe_interval_s, is_last
        self.channel = open_channel(address, credentials, CHANNEL_OPTIONS)
        self._stub = stage_grpc.StageWorkerStub(self.channel)
        self._closed = threading.Event()
        self._sampler_table: list[str] = []  # the latest sent; written by the streams' threads
        self._plans = self._open()

    def _open(self) -> StreamSender:
        stub, index, post, is_last = self._stub, self.index, self._post, self.is_last

        def call(plans):
            for done in stub.Steps(self._with_sampler_table(plans)):
                if done.error:
                    post(StepFailed(done.step_id, index, done.error, done.error_code))
                elif is_last and done.step_id:
                    post(StepComputed(done.step_id))

        return StreamSender(call, f"plans->stage{index}", on_break=lambda why: post(StageDown(index, why)))

    def _with_sampler_table(self, plans: Iterator[stage_pb.StepPlan]) -> Iterator[stage_pb.StepPlan]:
        """A stream opened again (the stage may have restarted) begins with the sampler table."""
        if self._sampler_table:
            yield stage_pb.StepPlan(sampler_addresses=self._sampler_table)
        for plan in plans:
            if plan.sampler_addresses:
                self._sampler_table = list(plan.sampler_addresses)
            yield plan

    def send(self, plan: stage_pb.StepPlan) -> None:
        self._plans.send(plan)

    def reset(self) -> None:
        old, self._plans = self._plans, self._open()
        threading.Thread(target=old.close, daemon=True).start()  # its stream may be stuck on a dead peer

    def watch(self) -> None:
        def probe() -> None:
            while not self._closed.wait(self._probe_interval_s):
                try:
                    self._stub.GetStageInfo(stage_pb.GetStageInfoRequest(), timeout=RPC_TIMEOUT_S)
                except grpc.RpcError:
                    continue  # not back yet, or still loading its weights (UNAVAILABLE)
                self._post(StageUp(self.index))
                return

        threading.Thread(target=probe, name=f"probe-stage{self.index}", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        self._plans.close()
        self.channel.close()


class GrpcSampler:
    def __init__(self, address: str, post: Post, credentials: Credentials | None = None):
        self.address, self._post = address, post
        self._worker = _Worker(address, credentials)
        self._stub = cpu_sampler_pb2_grpc.CpuSamplerStub(self._worker.channel)
        self._closed = threading.Event()
        self._call: grpc.Call | None = None  # the Results call, cancelled on close
        self._plans: StreamSender | None = None  # the Plans stream, opened with the first plan

    def start(self) -> None:
        threading.Thread(target=self._follow_results, name=f"results<-{self.address}", daemon=True).start()

    def add(self, sequences: list[cpu_sampler_pb2.SamplerSequence]) -> None:
        request_ids = tuple(s.request_id for s in sequences)

        def add() -> None:
            try:
                self._stub.AddSequences(cpu_sampler_pb2.AddSequencesRequest(sequences=sequences), timeout=RPC_TIMEOUT_S)
            except grpc.RpcError as e:
                self._post(SequencesAdded(self, request_ids, f"AddSequences failed: {e.code().name}"))
            else:
                self._post(SequencesAdded(self, request_ids))

        self._worker.call(add)

    def release(self, request_ids: list[str]) -> None:
        request = cpu_sampler_pb2.ReleaseSequencesRequest(request_ids=request_ids)
        self._worker.call(lambda: self._stub.ReleaseSequences(request, timeout=RPC_TIMEOUT_S))

    def send_plan(self, plan: cpu_sampler_pb2.SamplePlan) -> None:
        if self._plans is None:
            self._plans = StreamSender(self._stub.Plans, f"plans->{self.address}")
        self._plans.send(plan)

    def reconnect(self) -> None:
        if self._call is not None:
            self._call.cancel()  # _follow_results subscribes again

    def close(self) -> None:
        self._closed.set()
        if self._call is not None:
            self._call.cancel()
        self._worker.close(then=self._plans.close if self._plans is not None else None)

    def _follow_results(self) -> None:
        """Follow the Results stream; resubscribe while the replica stays in the pool."""
        while not self._closed.is_set():
            try:
                self._call = self._stub.Results(cpu_sampler_pb2.ResultsRequest())
                for batch in self._call:
                    if batch.step_id == 0:  # the subscription is confirmed
                        self._post(SamplerUp(self))
                    else:
                        self._post(TokensSampled(self, batch))
                reason = "its Results stream ended"
            except grpc.RpcError as e:
                reason = f"its Results stream failed: {e.code().name}"
            if not self._closed.is_set():
                self._post(SamplerDown(self, reason))
                self._closed.wait(0.5)


class GrpcKvStore:
    def __init__(self, address: str, credentials: Credentials | None = None):
        self._worker = _Worker(address, credentials)
        self._stub = kv_store_pb2_grpc.KvStoreStub(self._worker.channel)

    def free(self, request_ids: list[str]) -> None:
        request = kv_store_pb2.FreeBlocksRequest(request_ids=request_ids)
        self._worker.call(lambda: self._stub.FreeBlocks(request, timeout=RPC_TIMEOUT_S))

    def close(self) -> None:
        self._worker.close()
