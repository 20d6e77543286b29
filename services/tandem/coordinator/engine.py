"""The coordinator's loop: receive events, commit what they settle, schedule, send.

One thread owns the requests, the scheduler and the sampler pool. The front (the servicer on
its asyncio loop) sees only `submit`, `abort` and the published `snapshot`; committed tokens go
onto each request's `outputs`, and once per turn `on_outputs` is given every request that got
some, so that the front wakes their readers with one hand-over whatever the number of tokens. Stages, sampler replicas and the KV store are
reached through ports that never block; what they answer comes back as events.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
from tandem.coordinator.pool import SamplerPool
from tandem.coordinator.ports import KvStorePort, SamplerPort, StagePort
from tandem.coordinator.requests import Request
from tandem.coordinator.scheduler import Scheduler
from tandem.coordinator.stage_health import StageHealth
from tandem.coordinator.steps import Commit, Sampled, Status, Step
from tandem.core.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    ResourceExhaustedError,
    TandemError,
    UnavailableError,
)
from tandem.core.wire import frames
from tandem.core.wire.discovery import SamplerDiscovery
from tandem.v1 import common_pb2

log = logging.getLogger(__name__)

Inbox = queue.SimpleQueue  # of Event: what every thread posts to the loop


class SamplingError(TandemError):
    """A sampler could not sample a sequence's logits row."""


@dataclass(frozen=True)
class Snapshot:
    """What the front may read: published by the loop after each turn, never changed."""

    num_running: int = 0
    num_waiting: int = 0  # swapped out included
    num_blocks_used: int = 0
    num_preemptions: int = 0
    samplers: tuple[str, ...] = ()  # the replicas up, by address
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, found there
    unavailable: str = ""  # why new requests are refused (a stage down too long); empty: they are not
    phase: str = ""  # with temporal phases: "prefill" or "decode"; empty: off
    phase_switches: tuple[int, int] = (0, 0)  # with temporal phases: switches to prefill, to decode
    sampler_indices: tuple[int, ...] = ()  # of each replica up, its index in the stages' sampler table


class Engine:
    def __init__(self, scheduler: Scheduler, stages: Sequence[StagePort], open_sampler: Callable[[str], SamplerPort],
                 kv_store: KvStorePort | None, inbox: Inbox, *, max_queue: int, step_timeout_s: float,
                 sample_plans: bool = True, hosted_sampler: str = "", stage_health: StageHealth | None = None,
                 on_outputs: Callable[[list[Request]], None] = lambda requests: None):
        self.scheduler, self.max_queue, self.step_timeout_s = scheduler, max_queue, step_timeout_s
        self.sample_plans = sample_plans
        self.snapshot = Snapshot()
        self._health = stage_health or StageHealth(timeout_s=15.0, recover=True)
        self._draining = False
        self._stages, self._open_sampler, self._kv_store, self._inbox = stages, open_sampler, kv_store, inbox
        # hosted_sampler: the last stage's address when it hosts a sampler for argmax-only rows
        self._pool = SamplerPool(hosted_sampler)
        self._sampler_table = plans.SamplerTable(hosted_sampler)  # the replicas by index, as the stages know them
        self._requests: dict[str, Request] = {}
        self._on_outputs = on_outputs
        self._given_outputs: dict[Request, None] = {}  # requests given outputs this turn, once each
        self._lock = threading.Lock()  # guards the three below, shared with the front
        self._live_ids: set[str] = set()  # ids submitted and not yet ended
        self._num_unreceived = 0  # requests submitted and not yet taken in by the loop
        self._discovery: SamplerDiscovery | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._handlers: dict[type, Callable] = {
            Submitted: self._on_submitted, Aborted: self._on_aborted, MembershipChanged: self._on_membership,
            SamplerUp: self._on_sampler_up, SamplerDown: self._on_sampler_down,
            SequencesAdded: self._on_sequences_added, TokensSampled: self._on_tokens_sampled,
            StepComputed: self._on_step_computed, StepFailed: self._on_step_failed,
            StageDown: self._on_stage_down, StageUp: self._on_stage_up,
        }

    def start(self, discovery: SamplerDiscovery) -> None:
        self._discovery = discovery
        self._thread.start()
        discovery.start(lambda addresses: self._inbox.put(MembershipChanged(addresses)))

    def drain(self, grace_s: float) -> bool:
        """Refuse new requests (UNAVAILABLE) and wait, at most `grace_s`, for the admitted ones to
        end; whether they all did."""
        with self._lock:
            self._draining = True
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._live_ids:
                    return True
            time.sleep(0.05)
        log.warning("%d requests still running after the %.0f s drain", len(self._live_ids), grace_s)
        return False

    def stop(self) -> None:
        self._stopping.set()
        if self._discovery is not None:
            self._discovery.stop()
        self._thread.join(timeout=5)
        for stage in self._stages:
            stage.close()
        for replica in self._pool.replicas.values():
            replica.port.close()
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
        with self._lock:
            self._check_admission()
            if request.request_id in self._live_ids:
                raise AlreadyExistsError(f"request id {request.request_id!r} is already in use")
            self._live_ids.add(request.request_id)
            self._num_unreceived += 1
        self._inbox.put(Submitted(request))

    def check_admission(self, num_preparing: int = 0) -> None:
        """Refuse now what `submit` would refuse whatever the request (draining, a stage down too
        long, the queue full), so that the front does no work, such as tokenizing, for it;
        `num_preparing` requests the front let in and has not yet submitted count as queued."""
        with self._lock:
            self._check_admission(num_preparing)

    def _check_admission(self, num_preparing: int = 0) -> None:  # under self._lock
        if self._draining:
            raise UnavailableError("the coordinator is shutting down; retry on another replica")
        if self.snapshot.unavailable:
            raise UnavailableError(f"{self.snapshot.unavailable}; retry later")
        if self.snapshot.num_waiting + self._num_unreceived + num_preparing >= self.max_queue:
            raise ResourceExhaustedError(f"the queue is full ({self.max_queue} requests waiting); retry later")

    def abort(self, request_id: str, finish_reason: int = common_pb2.FINISH_REASON_ABORTED) -> bool:
        """End a live request early; False if no request with that id is live."""
        with self._lock:
            is_live = request_id in self._live_ids
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
                    step.step_id, len(s.input_ids), len(step.sequences))) is not None:
                traced.append(span)
        traceparent = request_trace.step_traceparent(traced) if traced else ""
        if self.sample_plans:  # ahead of the stages' plans, so they are there before the logits
            for address, plan in plans.sample_plans(step, traceparent, self._pool.hosted).items():
                if (port := self._pool.port(address)) is not None:
                    port.send_plan(plan)
        plan = plans.step_plan(step, self._sampler_table, traceparent)
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
        with self._lock:
            self._live_ids.discard(request_id)
        was_swapped = request.status == Status.SWAPPED
        commits = self.scheduler.finish(request_id)
        if (port := self._pool.release(request_id)) is not None:
            port.release([request_id])
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
                            s.num_preemptions, self._pool.addresses_up, s.blocks.num_queried_tokens,
                            s.blocks.num_hit_tokens,
                            self._health.message() if self._health.expired(time.monotonic()) else "",
                            phase=s.phases.phase.value if s.phases is not None else "",
                            phase_switches=s.phases.switch_counts() if s.phases is not None else (0, 0),
                            sampler_indices=tuple(self._sampler_table.index(a) for a in self._pool.addresses_up))
        with self._lock:
            self.snapshot = snapshot
            self._num_unreceived -= num_received

    # --- events -------------------------------------------------------------------------

    def _on_submitted(self, event: Submitted) -> None:
        request = event.request
        self._requests[request.request_id] = request
        self.scheduler.add(request)  # it waits, unscheduled, until a replica holds it
        self._place([request.request_id])

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

    # --- sampler replicas ---------------------------------------------------------------

    def _on_membership(self, event: MembershipChanged) -> None:
        addresses = event.addresses | {self._pool.hosted} if self._pool.hosted else event.addresses
        for address in addresses - self._pool.replicas.keys():
            port = self._open_sampler(address)
            self._pool.join(port)
            port.start()
        for address in self._pool.replicas.keys() - addresses:
            port, moved = self._pool.leave(address)
            port.close()
            self._move(moved, address, "removed from the sampler pool")

    def _on_sampler_up(self, event: SamplerUp) -> None:
        if self._pool.up(event.port):
            log.info("sampler %s is up", event.port.address)
            self._place([rid for rid in self._requests if not self._pool.has_placed(rid)])

    def _on_sampler_down(self, event: SamplerDown) -> None:
        self._move(self._pool.down(event.port), event.port.address, event.reason)

    def _on_sequences_added(self, event: SequencesAdded) -> None:
        if event.error:  # the replica is out until it confirms a new subscription
            moved = self._pool.down(event.port)
            self._move(moved, event.port.address, event.error)
            event.port.release(sorted({*moved, *event.request_ids}))  # whatever it took, once it answers
            event.port.reconnect()
            return
        for rid in self._pool.confirm(event.port, event.request_ids):
            self._requests[rid].sampler = event.port.address  # from now on it is scheduled

    def _place(self, request_ids: list[str]) -> None:
        for port, placed in self._pool.place(request_ids, lambda rid: self._requests[rid].options.needs_only_argmax).items():
            port.add([self._requests[rid].sampler_sequence(self.scheduler.sampled_token(rid)) for rid in placed])

    def _move(self, moved: list[str], address: str, reason: str) -> None:
        """These sequences lost their replica: their unanswered rows run again, and they go to
        the other replicas with the tokens sampled so far."""
        if not moved:
            return
        log.warning("sampler %s is down (%s); moving its %d sequences", address, reason, len(moved))
        for rid in moved:
            self._requests[rid].sampler = ""
        self._commit(self.scheduler.retry(moved))
        self._place([rid for rid in moved if rid in self._requests])
