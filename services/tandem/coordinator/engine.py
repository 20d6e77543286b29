"""The coordinator's loop: receive events, commit what they settle, schedule, send.

One thread owns the requests, the scheduler and the sampler replicas. The front (the servicer
on its asyncio loop) sees only `submit`, `abort` and the published `snapshot`; committed tokens
go onto each request's `outputs`, and once per turn `on_outputs` is given every request that
got some, so that the front wakes their readers with one hand-over whatever the number of
tokens. Stages, sampler replicas and the KV store are reached through ports that never block;
what they answer comes back as events.

Beside the loop: the sampler replicas' membership and failover (samplers.py), and what the
front's threads and the loop share under one lock, admission included (gate.py).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from tandem.coordinator import plans, request_trace
from tandem.coordinator.events import (
    Aborted,
    Event,
    MembershipChanged,
    SamplerDown,
    SamplerUp,
    SequencesAdded,
    StageDown,
    StageUp,
    StepComputed,
    StepFailed,
    Submitted,
    TokensSampled,
)
from tandem.coordinator.gate import Gate, Snapshot
from tandem.coordinator.ports import KvStorePort, SamplerPort, StagePort
from tandem.coordinator.requests import Request
from tandem.coordinator.samplers import Samplers
from tandem.coordinator.scheduler import Scheduler
from tandem.coordinator.stage_health import StageHealth
from tandem.coordinator.steps import Commit, Sampled, Status, Step
from tandem.core.errors import InvalidArgumentError, TandemError, UnavailableError
from tandem.core.wire import frames
from tandem.core.wire.discovery import SamplerDiscovery
from tandem.v1 import common_pb2

log = logging.getLogger(__name__)

Inbox = queue.SimpleQueue  # of Event: what every thread posts to the loop


class SamplingError(TandemError):
    """A sampler could not sample a sequence's logits row."""


class Engine:
    def __init__(self, scheduler: Scheduler, stages: Sequence[StagePort], open_sampler: Callable[[str], SamplerPort],
                 kv_store: KvStorePort | None, inbox: Inbox, *, max_queue: int, step_timeout_s: float,
                 sample_plans: bool = True, hosted_sampler: str = "", stage_health: StageHealth | None = None,
                 on_outputs: Callable[[list[Request]], None] = lambda requests: None):
        self.scheduler, self.step_timeout_s = scheduler, step_timeout_s
        self.sample_plans = sample_plans
        self._gate = Gate(max_queue)  # shared with the front
        self._health = stage_health or StageHealth(timeout_s=15.0, recover=True)
        self._stages, self._kv_store, self._inbox = stages, kv_store, inbox
        self._requests: dict[str, Request] = {}
        # hosted_sampler: the last stage's address when it hosts a sampler for argmax-only rows
        self._samplers = Samplers(open_sampler, hosted_sampler, self._requests, scheduler, self._commit)
        self._on_outputs = on_outputs
        self._given_outputs: dict[Request, None] = {}  # requests given outputs this turn, once each
        self._discovery: SamplerDiscovery | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        samplers = self._samplers
        self._handlers: dict[type, Callable] = {
            Submitted: self._on_submitted, Aborted: self._on_aborted, MembershipChanged: samplers.on_membership,
            SamplerUp: samplers.on_up, SamplerDown: samplers.on_down, SequencesAdded: samplers.on_sequences_added,
            TokensSampled: self._on_tokens_sampled, StepComputed: self._on_step_computed,
            StepFailed: self._on_step_failed, StageDown: self._on_stage_down, StageUp: self._on_stage_up,
        }

    @property
    def snapshot(self) -> Snapshot:
        """The loop's state after its last turn, for the front."""
        return self._gate.snapshot

    def start(self, discovery: SamplerDiscovery) -> None:
        self._discovery = discovery
        self._thread.start()
        discovery.start(lambda addresses: self._inbox.put(MembershipChanged(addresses)))

    def drain(self, grace_s: float) -> bool:
        """Refuse new requests (UNAVAILABLE) and wait, at most `grace_s`, for the admitted ones to
        end; whether they all did."""
        return self._gate.drain(grace_s)

    def stop(self) -> None:
        self._stopping.set()
        if self._discovery is not None:
            self._discovery.stop()
        self._thread.join(timeout=5)
        for stage in self._stages:
            stage.close()
        self._samplers.close()
        if self._kv_store is not None:
            self._kv_store.close()

    # --- called from the front ----------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue a request, its id reserved until it ends: a second live request with the same id
        is refused here, whichever call comes first."""
        try:
            request.sampler_sequence()
        except (TypeError, ValueError) as e:  # a value the wire cannot carry
            raise InvalidArgumentError(f"request {request.request_id!r}: {e}") from e
        self._gate.reserve(request.request_id)
        self._inbox.put(Submitted(request))

    def check_admission(self, num_preparing: int = 0) -> None:
        """Refuse now what `submit` would refuse whatever the request (draining, a stage down too
        long, the queue full), so that the front does no work, such as tokenizing, for it;
        `num_preparing` requests the front let in and has not yet submitted count as queued."""
        self._gate.check(num_preparing)

    def abort(self, request_id: str, finish_reason: int = common_pb2.FINISH_REASON_ABORTED) -> bool:
        """End a live request early; False if no request with that id is live."""
        is_live = self._gate.is_live(request_id)
        if is_live:
            self._inbox.put(Aborted(request_id, finish_reason))
        return is_live

    # --- the loop -----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            self.run_once(timeout_s=0.05)

    def run_once(self, timeout_s: float = 0.0) -> None:
        """One turn: take the events that have arrived (waiting up to `timeout_s` for the first),
        commit what they settle, then schedule and send steps while the scheduler has them."""
        events = self._receive(timeout_s)
        for event in events:
            try:
                self._handlers[type(event)](event)
            except Exception:  # the loop must survive any one event
                log.exception("engine event %s failed", type(event).__name__)
        self._fail_expired()
        if self._health.any_down:  # nothing runs until every stage is back
            if self._health.expired(time.monotonic()) and self._requests:
                self._fail_all(UnavailableError(self._health.message()))
        else:
            while (step := self.scheduler.schedule()) is not None:
                self._send(step)
        self._publish(num_received=sum(isinstance(e, Submitted) for e in events))
        if self._given_outputs:
            given, self._given_outputs = list(self._given_outputs), {}
            self._on_outputs(given)

    def _receive(self, timeout_s: float) -> list[Event]:
        events = []
        try:
            events.append(self._inbox.get(timeout=timeout_s) if timeout_s > 0 else self._inbox.get_nowait())
            while True:
                events.append(self._inbox.get_nowait())
        except queue.Empty:
            return events

    def _send(self, step: Step) -> None:
        now = time.monotonic()
        traced = []  # spans of this step's traced requests
        for s in step.sequences:
            request = self._requests[s.request_id]
            request.scheduled_time = request.scheduled_time or now
            if request.trace is not None and (span := request.trace.begin_step(
                    step.step_id, len(s.input_ids) or 1, len(step.sequences))) is not None:
                traced.append(span)
        traceparent = request_trace.step_traceparent(traced) if traced else ""
        if self.sample_plans:  # ahead of the stages' plans, so they are there before the logits
            self._samplers.send_plans(step, traceparent)
        plan = plans.step_plan(step, self._samplers.table, traceparent)
        for stage in self._stages:
            stage.send(plan)

    def _commit(self, commits: list[Commit]) -> None:
        """Hand committed tokens to their requests; a request its token rules end is finished,
        and what that completes of its step is committed in turn."""
        i = 0
        while i < len(commits):
            request = self._requests.get(commits[i][0].request_id)
            if request is not None:
                request.commit(commits[i][1].logprobs)
                self._given_outputs[request] = None
                if request.is_finished:
                    commits += self._end(request.request_id, request.finish_reason)
            i += 1

    def _end(self, request_id: str, finish_reason: int, error: Exception | None = None) -> list[Commit]:
        """End a request (a no-op on one its stop rules ended) and free what it holds everywhere."""
        request = self._requests.pop(request_id)
        request.fail(finish_reason, error)
        self._given_outputs[request] = None
        self._gate.end(request_id)
        was_swapped = request.status == Status.SWAPPED
        commits = self.scheduler.finish(request_id)
        self._samplers.release(request_id)
        if was_swapped and self._kv_store is not None:
            self._kv_store.free([request_id])
        return commits

    def _fail_all(self, error: Exception) -> None:
        commits: list[Commit] = []
        for rid in list(self._requests):
            commits += self._end(rid, common_pb2.FINISH_REASON_ERROR, error)
        self._commit(commits)

    def _fail_expired(self) -> None:
        for step_id in self.scheduler.expired(sent_before=time.monotonic() - self.step_timeout_s):
            self._on_step_failed(StepFailed(step_id, -1, f"no result within {self.step_timeout_s:.0f}s",
                                            common_pb2.ERROR_CODE_DEADLINE_EXCEEDED))

    def _publish(self, num_received: int) -> None:
        s = self.scheduler
        snapshot = Snapshot(s.num_running, s.num_waiting, s.blocks.num_blocks - s.blocks.num_free,
                            s.num_preemptions, self._samplers.addresses_up, s.blocks.num_queried_tokens,
                            s.blocks.num_hit_tokens,
                            self._health.message() if self._health.expired(time.monotonic()) else "",
                            phase=s.phases.phase.value if s.phases is not None else "",
                            phase_switches=s.phases.switch_counts() if s.phases is not None else (0, 0),
                            sampler_indices=self._samplers.indices_up(), num_chained_steps=s.num_chained_steps)
        self._gate.publish(snapshot, num_received)

    # --- events -------------------------------------------------------------------------

    def _on_submitted(self, event: Submitted) -> None:
        request = event.request
        self._requests[request.request_id] = request
        self.scheduler.add(request)  # it waits, unscheduled, until a replica holds it
        self._samplers.place([request.request_id])

    def _on_aborted(self, event: Aborted) -> None:
        if event.request_id in self._requests:
            self._commit(self._end(event.request_id, event.finish_reason))

    def _on_tokens_sampled(self, event: TokensSampled) -> None:
        batch = event.batch
        rows = {t.request_id: Sampled(t.token_id, t.logprobs if t.HasField("logprobs") else None)
                for t in batch.tokens}
        commits = self.scheduler.update(batch.step_id, rows)
        if batch.error:  # rows this sampler could not sample: their requests fail now, not at the timeout
            error = SamplingError(f"sampler {event.port.address} ({frames.error_name(batch.error_code)}): {batch.error}")
            for rid in self.scheduler.unanswered(batch.step_id):
                if self._requests[rid].sampler == event.port.address:
                    commits += self._end(rid, common_pb2.FINISH_REASON_ERROR, error)
        self._commit(commits)

    def _on_step_computed(self, event: StepComputed) -> None:
        self._commit(self.scheduler.computed(event.step_id))

    def _on_step_failed(self, event: StepFailed) -> None:
        who = f"stage {event.stage}" if event.stage >= 0 else "the pipeline"
        kind = frames.error_name(event.code)
        if event.code == common_pb2.ERROR_CODE_INVALID_ARGUMENT:  # not a fault of the stage's: the two disagree
            log.error("%s refused step %d: %s (check that the stage's and the coordinator's configs match)",
                      who, event.step_id, event.error)
        error = UnavailableError(f"{who} failed step {event.step_id} ({kind}): {event.error}")
        commits: list[Commit] = []
        for rid in self.scheduler.fail(event.step_id):
            commits += self._end(rid, common_pb2.FINISH_REASON_ERROR, error)
        self._commit(commits)

    def _on_stage_down(self, event: StageDown) -> None:
        if not self._health.down(event.stage, event.reason, time.monotonic()):
            return
        log.warning("stage %d is down (%s); %s", event.stage, event.reason,
                    "its sequences recompute once it is back" if self._health.recover else "its sequences fail")
        for stage in self._stages:  # every stage drops the plans it has not run
            stage.reset()
        self._stages[event.stage].watch()
        if not self._health.recover:
            self._fail_all(UnavailableError(f"{self._health.message()}; recovery is off"))
            return
        swapped = self.scheduler.recompute_all()
        if swapped and self._kv_store is not None:
            self._kv_store.free(swapped)

    def _on_stage_up(self, event: StageUp) -> None:
        if self._health.up(event.stage):
            log.info("stage %d is back", event.stage)
