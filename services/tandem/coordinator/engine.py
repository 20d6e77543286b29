"""The coordinator's I/O loop: turns scheduler steps into plans on the stages' streams and
sampled tokens from the samplers' streams into commits. One thread owns all state.

Sampler replicas come and go (discovery, crashes). A replica takes sequences once its Results
stream is confirmed; when it is removed or its stream breaks, its sequences move to the
others with their committed tokens, and rows it had not answered run again. Sampling is a
pure function of (row, seed, index, history), so the moved rows give the same tokens.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import grpc

from tandem.coordinator.discovery import SamplerDiscovery
from tandem.coordinator.requests import Request
from tandem.coordinator.scheduler import Scheduler, Sequence, Status, Step
from tandem.core.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    ResourceExhaustedError,
    TandemError,
    UnavailableError,
)
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
    request_ids: set[str]  # rows still expected: membership is checked for every sampled token
    sent_time: float = field(default_factory=time.monotonic)
    tokens: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, common_pb2.SampleLogprobs] = field(default_factory=dict)


@dataclass(eq=False)
class _Replica:
    """A sampler replica: its stub, its Results stream and whether it takes sequences."""

    address: str
    channel: grpc.Channel
    stub: cpu_sampler_pb2_grpc.CpuSamplerStub
    up: bool = False  # its Results stream is confirmed; it holds sequences only while up
    load: int = 0  # sequences it holds
    closed: threading.Event = field(default_factory=threading.Event)
    call: object = None  # the Results call, cancelled on close
    plans: StreamSender | None = None  # its Plans stream, opened with the first plan

    def send_plan(self, plan: cpu_sampler_pb2.SamplePlan) -> None:
        if self.plans is None:
            self.plans = StreamSender(self.stub.Plans, f"plans->{self.address}")
        self.plans.send(plan)

    def close(self) -> None:
        self.closed.set()
        if self.call is not None:
            self.call.cancel()
        if self.plans is not None:
            self.plans.close()
        self.channel.close()


class Engine:
    def __init__(self, scheduler: Scheduler, stages: list[str], discovery: SamplerDiscovery, kv_store: str,
                 max_queue: int, step_timeout_s: float, sample_plans: bool = True):
        self.scheduler, self.max_queue, self.step_timeout_s = scheduler, max_queue, step_timeout_s
        self.sample_plans = sample_plans
        self.requests: dict[str, Request] = {}
        self._ids_lock = threading.Lock()
        self._live_ids: set[str] = set()  # ids submitted and not yet finished; see submit
        self.pending: dict[int, _PendingStep] = {}
        self._events: queue.Queue = queue.Queue()
        self._stopping = threading.Event()
        self._channels: list[grpc.Channel] = []
        self.stage_stubs = [stage_grpc.StageWorkerStub(self._channel(a)) for a in stages]
        self.stage_addresses = list(stages)
        self._plan_senders = [self._open_steps(i, stub) for i, stub in enumerate(self.stage_stubs)]
        self.replicas: dict[str, _Replica] = {}
        self._specs: dict[str, cpu_sampler_pb2.SamplerSequence] = {}  # what AddSequences sends, by request
        self.discovery = discovery
        self.kv_store = kv_store_pb2_grpc.KvStoreStub(self._channel(kv_store)) if kv_store else None
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self.discovery.start(lambda addresses: self._events.put(("membership", addresses)))

    # --- called from servicer threads ---------------------------------------------------

    def submit(self, request: Request, params: common_pb2.SamplingParams) -> None:
        """Queue a request, its id reserved until it ends: a second live request with the same id
        is refused here, whichever servicer thread comes first."""
        with self._ids_lock:
            if request.request_id in self._live_ids:
                raise AlreadyExistsError(f"request id {request.request_id!r} is already in use")
            if self.scheduler.num_waiting + self._events.qsize() >= self.max_queue:
                raise ResourceExhaustedError(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self._live_ids.add(request.request_id)
        self._events.put(("add", request, params))

    def abort(self, request_id: str, finish_reason: int = common_pb2.FINISH_REASON_ABORTED) -> None:
        self._events.put(("abort", request_id, finish_reason))

    def stop(self) -> None:
        self._stopping.set()
        self.discovery.stop()
        self._thread.join(timeout=5)
        for sender in self._plan_senders:
            sender.close()
        for replica in self.replicas.values():
            replica.close()
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
        seq = Sequence(request.request_id, list(request.prompt_ids), request.max_tokens)
        try:
            spec = cpu_sampler_pb2.SamplerSequence(
                request_id=request.request_id, params=params, seed=request.seed, prompt_ids=request.prompt_ids,
                min_tokens_blocked_ids=sorted(request.eos_token_ids | set(request.options.stop_token_ids)),
            )
        except (TypeError, ValueError) as e:  # a value the wire cannot carry: the request ends, nothing waits
            request.fail(common_pb2.FINISH_REASON_ERROR, InvalidArgumentError(f"request {request.request_id!r}: {e}"))
            with self._ids_lock:
                self._live_ids.discard(request.request_id)
            return
        self._specs[request.request_id] = spec
        self.requests[request.request_id] = request
        self.scheduler.add(seq)  # it waits, unscheduled, until a replica holds it
        self._assign([seq])

    # --- sampler replicas ---------------------------------------------------------------

    def _on_membership(self, addresses: frozenset[str]) -> None:
        for address in addresses - self.replicas.keys():
            channel = self._channel(address, keep=False)
            replica = _Replica(address, channel, cpu_sampler_pb2_grpc.CpuSamplerStub(channel))
            self.replicas[address] = replica
            threading.Thread(target=self._read_results, args=(replica,), name=f"results<-{address}", daemon=True).start()
        for address in self.replicas.keys() - addresses:
            replica = self.replicas.pop(address)
            replica.close()
            self._evacuate(replica, "removed from the sampler pool")

    def _on_sampler_up(self, replica: _Replica) -> None:
        if self.replicas.get(replica.address) is replica and not replica.up:
            log.info("sampler %s is up", replica.address)
            replica.up = True
            self._assign([s for s in self.scheduler.seqs.values() if not s.sampler])

    def _on_sampler_down(self, replica: _Replica, reason: str) -> None:
        if self.replicas.get(replica.address) is replica:
            self._evacuate(replica, reason)

    def _evacuate(self, replica: _Replica, reason: str) -> None:
        """`replica` holds no sequences from now on: its rows not yet answered run again and its
        sequences go to the other replicas with the tokens committed so far."""
        if not replica.up:
            return
        replica.up, replica.load = False, 0
        moved = [s for s in self.scheduler.seqs.values() if s.sampler == replica.address]
        log.warning("sampler %s is down (%s); moving its %d sequences", replica.address, reason, len(moved))
        for step_id, pending in list(self.pending.items()):
            lost = [r for r in pending.request_ids if r not in pending.tokens and r in self.scheduler.seqs
                    and self.scheduler.seqs[r].sampler == replica.address]
            if lost:
                pending.request_ids.difference_update(lost)
                self.scheduler.retry(step_id, lost)
                self._maybe_complete(step_id)
        for seq in moved:
            seq.sampler = ""
        self._assign([s for s in moved if s.request_id in self.scheduler.seqs])

    def _assign(self, seqs: list[Sequence]) -> None:
        """Give each sequence to the least loaded replica that is up; with none up they wait."""
        up = [r for r in self.replicas.values() if r.up]
        if not seqs or not up:
            return
        groups: dict[_Replica, list[Sequence]] = defaultdict(list)
        for seq in seqs:
            replica = min(up, key=lambda r: r.load)
            replica.load += 1
            groups[replica].append(seq)
        for replica, group in groups.items():
            request = cpu_sampler_pb2.AddSequencesRequest(sequences=[self._spec(s) for s in group])
            try:
                replica.stub.AddSequences(request, timeout=10)
            except grpc.RpcError as e:
                replica.load -= len(group)
                self._evacuate(replica, f"AddSequences failed: {e.code().name}")
                self._assign(group)
                continue
            for seq in group:
                seq.sampler = replica.address

    def _spec(self, seq: Sequence) -> cpu_sampler_pb2.SamplerSequence:
        """The sequence as a replica must hold it: its committed outputs, plus a token already
        sampled in a step that has not completed yet (a sequence is in at most one step)."""
        output_ids = list(seq.output_ids)
        for pending in self.pending.values():
            if seq.request_id in pending.tokens and seq.request_id in pending.request_ids:
                output_ids.append(pending.tokens[seq.request_id])
        spec = cpu_sampler_pb2.SamplerSequence()
        spec.CopyFrom(self._specs[seq.request_id])
        spec.output_ids[:] = output_ids
        return spec

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
            if t.request_id not in pending.request_ids or t.request_id in pending.tokens:
                continue  # a row that was moved to another replica, or answered already
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
        with self._ids_lock:
            self._live_ids.discard(request_id)
        request = self.requests.pop(request_id, None)
        seq = self.scheduler.seqs.get(request_id)
        if request is None or seq is None:
            return
        was_swapped = seq.status == Status.SWAPPED
        self.scheduler.finish(request_id)
        self._specs.pop(request_id, None)
        replica = self.replicas.get(seq.sampler)
        try:
            if replica is not None and replica.up:
                replica.load -= 1
                replica.stub.ReleaseSequences(cpu_sampler_pb2.ReleaseSequencesRequest(request_ids=[request_id]), timeout=10)
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
            self.pending[step.step_id] = _PendingStep({s.request_id for s in step.sequences})
        if self.sample_plans:  # ahead of the stages' plans, so it is there before the logits
            self._send_sample_plans(step)
        for sender in self._plan_senders:
            sender.send(plan)

    def _send_sample_plans(self, step: Step) -> None:
        """Each replica's rows of the step, in plan order: the order of its logits frame's rows."""
        rows: dict[str, cpu_sampler_pb2.SamplePlan] = {}
        for s in step.sequences:
            plan = rows.get(s.sampler)
            if plan is None:
                plan = rows[s.sampler] = cpu_sampler_pb2.SamplePlan(step_id=step.step_id)
            plan.request_ids.append(s.request_id)
            plan.sample_indices.append(s.sample_index)
        for address, plan in rows.items():
            replica = self.replicas.get(address)
            if replica is not None:
                replica.send_plan(plan)

    # --- streams ------------------------------------------------------------------------

    def _open_steps(self, index: int, stub: stage_grpc.StageWorkerStub) -> StreamSender:
        def call(plans):
            for done in stub.Steps(plans):
                if done.error:
                    self._events.put(("step_error", done.step_id, index, done.error))

        return StreamSender(call, f"plans->stage{index}")

    def _read_results(self, replica: _Replica) -> None:
        """Follow a replica's Results stream; resubscribe while it stays in the pool."""
        while not replica.closed.is_set() and not self._stopping.is_set():
            try:
                replica.call = replica.stub.Results(cpu_sampler_pb2.ResultsRequest())
                for batch in replica.call:
                    if batch.step_id == 0:  # the subscription is confirmed
                        self._events.put(("sampler_up", replica))
                    else:
                        self._events.put(("sampled", replica.address, batch))
                reason = "its Results stream ended"
            except grpc.RpcError as e:
                reason = f"its Results stream failed: {e.code().name}"
            if not replica.closed.is_set():
                self._events.put(("sampler_down", replica, reason))
                replica.closed.wait(0.5)

    def _channel(self, address: str, keep: bool = True) -> grpc.Channel:
        channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        if keep:
            self._channels.append(channel)
        return channel
