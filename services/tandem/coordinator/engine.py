"""The coordinator's I/O loop: turns scheduler steps into plans on the stages' streams and
sampled tokens from the samplers' streams into commits. One thread owns all state."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import grpc

from tandem.coordinator.requests import Request
from tandem.coordinator.scheduler import Scheduler, Sequence, Status, Step
from tandem.core.errors import ResourceExhaustedError, TandemError, UnavailableError
from tandem.core.server import CHANNEL_OPTIONS
from tandem.core.streams import StreamSender
from tandem.v1 import common_pb2, cpu_sampler_pb2, cpu_sampler_pb2_grpc, kv_store_pb2, kv_store_pb2_grpc
from tandem.v1 import stage_worker_pb2 as stage_pb
from tandem.v1 import stage_worker_pb2_grpc as stage_grpc

log = logging.getLogger(__name__)


class SamplingError(TandemError):
    """A sampler could not sample a sequence's logits row."""


@dataclass
class _PendingStep:
    request_ids: list[str]
    sent_time: float = field(default_factory=time.monotonic)
    tokens: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, common_pb2.SampleLogprobs] = field(default_factory=dict)


class Engine:
    def __init__(self, scheduler: Scheduler, stages: list[str], samplers: list[str], kv_store: str,
                 max_queue: int, step_timeout_s: float):
        self.scheduler, self.max_queue, self.step_timeout_s = scheduler, max_queue, step_timeout_s
        self.requests: dict[str, Request] = {}
        self.pending: dict[int, _PendingStep] = {}
        self._events: queue.Queue = queue.Queue()
        self._stopping = threading.Event()
        self._channels: list[grpc.Channel] = []
        self.stage_stubs = [stage_grpc.StageWorkerStub(self._channel(a)) for a in stages]
        self.stage_addresses = list(stages)
        self._plan_senders = [self._open_steps(i, stub) for i, stub in enumerate(self.stage_stubs)]
        self.sampler_stubs = {a: cpu_sampler_pb2_grpc.CpuSamplerStub(self._channel(a)) for a in samplers}
        self.sampler_load = {a: 0 for a in samplers}
        for address, stub in self.sampler_stubs.items():
            threading.Thread(target=self._read_results, args=(address, stub), daemon=True).start()
        self.kv_store = kv_store_pb2_grpc.KvStoreStub(self._channel(kv_store)) if kv_store else None
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # --- called from servicer threads ---------------------------------------------------

    def submit(self, request: Request, params: common_pb2.SamplingParams) -> None:
        if self.scheduler.num_waiting + self._events.qsize() >= self.max_queue:
            raise ResourceExhaustedError(f"the queue is full ({self.max_queue} requests waiting); retry later")
        self._events.put(("add", request, params))

    def abort(self, request_id: str, finish_reason: int = common_pb2.FINISH_REASON_ABORTED) -> None:
        self._events.put(("abort", request_id, finish_reason))

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        for sender in self._plan_senders:
            sender.close()
        for channel in self._channels:
            channel.close()

    # --- the loop -----------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                events = [self._events.get(timeout=0.05)]
                while not self._events.empty():
                    events.append(self._events.get_nowait())
            except queue.Empty:
                events = []
            for event in events:
                try:
                    getattr(self, f"_on_{event[0]}")(*event[1:])
                except Exception:  # noqa: BLE001 - the loop must survive any one event
                    log.exception("engine event %s failed", event[0])
            self._check_timeouts()
            while (step := self.scheduler.schedule()) is not None:
                self._send(step)

    def _on_add(self, request: Request, params: common_pb2.SamplingParams) -> None:
        sampler = min(self.sampler_load, key=self.sampler_load.get)
        seq = Sequence(request.request_id, list(request.prompt_ids), request.max_tokens, sampler=sampler)
        added = cpu_sampler_pb2.SamplerSequence(
            request_id=request.request_id, params=params, seed=request.seed, prompt_ids=request.prompt_ids,
            min_tokens_blocked_ids=sorted(request.eos_token_ids | set(request.options.stop_token_ids)),
        )
        try:
            self.sampler_stubs[sampler].AddSequences(cpu_sampler_pb2.AddSequencesRequest(sequences=[added]), timeout=10)
        except grpc.RpcError as e:
            request.fail(common_pb2.FINISH_REASON_ERROR, UnavailableError(f"sampler {sampler}: {e.details()}"))
            return
        self.sampler_load[sampler] += 1
        self.requests[request.request_id] = request
        self.scheduler.add(seq)

    def _on_abort(self, request_id: str, finish_reason: int) -> None:
        request = self.requests.get(request_id)
        if request is not None:
            request.fail(finish_reason)
            self._finish(request_id)

    def _on_sampled(self, address: str, batch: cpu_sampler_pb2.SampledBatch) -> None:
        pending = self.pending.get(batch.step_id)
        if pending is None:
            return
        for t in batch.tokens:
            pending.tokens[t.request_id] = t.token_id
            if t.HasField("logprobs"):
                pending.logprobs[t.request_id] = t.logprobs
        if batch.error:  # rows this sampler could not sample: their requests fail now, not at the timeout
            for rid in pending.request_ids:
                seq = self.scheduler.seqs.get(rid)
                if seq is not None and seq.sampler == address and rid not in pending.tokens:
                    self.requests[rid].fail(common_pb2.FINISH_REASON_ERROR, SamplingError(f"sampler {address}: {batch.error}"))
                    self._finish(rid)
        if batch.step_id in self.pending:
            self._maybe_complete(batch.step_id)

    def _on_step_error(self, step_id: int, stage: int, error: str) -> None:
        if (pending := self.pending.pop(step_id, None)) is None:
            return
        self.scheduler.fail_step(step_id)
        for rid in pending.request_ids:
            if (request := self.requests.get(rid)) is not None:
                request.fail(common_pb2.FINISH_REASON_ERROR, UnavailableError(f"stage {stage} failed step {step_id}: {error}"))
                self._finish(rid)

    def _maybe_complete(self, step_id: int) -> None:
        pending = self.pending[step_id]
        if any(rid not in pending.tokens for rid in pending.request_ids if rid in self.requests):
            return
        del self.pending[step_id]
        for seq in self.scheduler.complete(step_id, pending.tokens):
            request = self.requests[seq.request_id]
            request.commit(seq.output_ids[-1], pending.logprobs.get(seq.request_id))
            if request.is_finished:
                self._finish(seq.request_id)

    def _finish(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        seq = self.scheduler.seqs.get(request_id)
        if request is None or seq is None:
            return
        was_swapped = seq.status == Status.SWAPPED
        self.scheduler.finish(request_id)
        self.sampler_load[seq.sampler] -= 1
        try:
            release = cpu_sampler_pb2.ReleaseSequencesRequest(request_ids=[request_id])
            self.sampler_stubs[seq.sampler].ReleaseSequences(release, timeout=10)
            if was_swapped and self.kv_store is not None:
                self.kv_store.FreeBlocks(kv_store_pb2.FreeBlocksRequest(request_ids=[request_id]), timeout=10)
        except grpc.RpcError as e:  # the replica is gone; its state went with it
            log.warning("releasing %s: %s", request_id, e.details())
        for step_id in [s for s, p in self.pending.items() if request_id in p.request_ids]:
            self._maybe_complete(step_id)

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        for step_id, pending in list(self.pending.items()):
            if now - pending.sent_time > self.step_timeout_s:
                self._on_step_error(step_id, -1, f"no result within {self.step_timeout_s:.0f}s")

    def _send(self, step: Step) -> None:
        plan = stage_pb.StepPlan(
            step_id=step.step_id,
            finished_request_ids=step.finished_request_ids,
            swap_out=[stage_pb.BlockTransfer(request_id=r, block_ids=b) for r, b in step.swap_out],
            swap_in=[stage_pb.BlockTransfer(request_id=r, block_ids=b) for r, b in step.swap_in],
            sequences=[
                stage_pb.SequencePlan(
                    request_id=s.request_id, num_computed_tokens=s.num_computed_tokens, input_ids=s.input_ids,
                    block_table=s.block_table, sample_index=s.sample_index, sampler=s.sampler,
                )
                for s in step.sequences
            ],
        )
        now = time.monotonic()
        for s in step.sequences:
            request = self.requests[s.request_id]
            request.scheduled_time = request.scheduled_time or now
        if step.sequences:
            self.pending[step.step_id] = _PendingStep([s.request_id for s in step.sequences])
        for sender in self._plan_senders:
            sender.send(plan)

    # --- streams ------------------------------------------------------------------------

    def _open_steps(self, index: int, stub: stage_grpc.StageWorkerStub) -> StreamSender:
        def call(plans):
            for done in stub.Steps(plans):
                if done.error:
                    self._events.put(("step_error", done.step_id, index, done.error))

        return StreamSender(call, f"plans->stage{index}")

    def _read_results(self, address: str, stub: cpu_sampler_pb2_grpc.CpuSamplerStub) -> None:
        while not self._stopping.is_set():
            try:
                for batch in stub.Results(cpu_sampler_pb2.ResultsRequest()):
                    self._events.put(("sampled", address, batch))
            except grpc.RpcError as e:
                if not self._stopping.is_set():
                    log.warning("results stream of sampler %s ended: %s", address, e.code())
                    time.sleep(0.2)

    def _channel(self, address: str) -> grpc.Channel:
        channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._channels.append(channel)
        return channel
