"""The engine's sampler replicas: their membership, which one holds each sequence, and failover.

Replicas come and go (discovery, crashes). A replica takes sequences once its Results stream
is confirmed; when it is removed or its stream breaks, its sequences move to the others with
their committed tokens, and rows it had not answered run again. Sampling is a pure function of
(row, seed, index, history), so the moved rows give the same tokens.

Runs on the engine's loop thread, which hands it the sampler events; the bookkeeping of who
holds what is the pool's (pool.py), the stages' numbering of the replicas the table's (plans.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from tandem.coordinator import plans
from tandem.coordinator.events import MembershipChanged, SamplerDown, SamplerUp, SequencesAdded
from tandem.coordinator.pool import SamplerPool
from tandem.coordinator.ports import SamplerPort
from tandem.coordinator.requests import Request
from tandem.coordinator.scheduler import Scheduler
from tandem.coordinator.steps import Commit, Step

log = logging.getLogger(__name__)


class Samplers:
    def __init__(self, open_sampler: Callable[[str], SamplerPort], hosted: str, requests: dict[str, Request],
                 scheduler: Scheduler, commit: Callable[[list[Commit]], None]):
        """`hosted`: the last stage's address when it hosts a sampler for argmax-only rows;
        `requests`: the engine's live requests (read, and their `sampler` set here); `commit`:
        the engine's, for what moving sequences off a replica completes."""
        self._open_sampler = open_sampler
        self._pool = SamplerPool(hosted)
        self.table = plans.SamplerTable(hosted)  # the replicas by index, as the stages know them
        self._requests, self._scheduler, self._commit = requests, scheduler, commit

    @property
    def addresses_up(self) -> tuple[str, ...]:
        return self._pool.addresses_up

    def indices_up(self) -> tuple[int, ...]:
        """Of each replica up, its index in the stages' sampler table."""
        return tuple(self.table.index(a) for a in self._pool.addresses_up)

    def send_plans(self, step: Step, traceparent: str) -> None:
        """Send each replica up its rows of `step` (ahead of the stages' plans, so that they are
        there before the logits)."""
        for address, plan in plans.sample_plans(step, traceparent, self._pool.hosted).items():
            if (port := self._pool.port(address)) is not None:
                port.send_plan(plan)

    def place(self, request_ids: list[str]) -> None:
        """Hand these sequences to replicas that are up; with none up they wait."""
        for port, placed in self._pool.place(request_ids, lambda rid: self._requests[rid].options.needs_only_argmax).items():
            port.add([self._requests[rid].sampler_sequence(self._scheduler.sampled_token(rid)) for rid in placed])

    def release(self, request_id: str) -> None:
        """An ended sequence leaves its replica."""
        if (port := self._pool.release(request_id)) is not None:
            port.release([request_id])

    def close(self) -> None:
        for replica in self._pool.replicas.values():
            replica.port.close()

    # --- events -------------------------------------------------------------------------

    def on_membership(self, event: MembershipChanged) -> None:
        addresses = event.addresses | {self._pool.hosted} if self._pool.hosted else event.addresses
        for address in addresses - self._pool.replicas.keys():
            port = self._open_sampler(address)
            self._pool.join(port)
            port.start()
        for address in self._pool.replicas.keys() - addresses:
            port, moved = self._pool.leave(address)
            port.close()
            self._move(moved, address, "removed from the sampler pool")

    def on_up(self, event: SamplerUp) -> None:
        if self._pool.up(event.port):
            log.info("sampler %s is up", event.port.address)
            self.place([rid for rid in self._requests if not self._pool.has_placed(rid)])

    def on_down(self, event: SamplerDown) -> None:
        self._move(self._pool.down(event.port), event.port.address, event.reason)

    def on_sequences_added(self, event: SequencesAdded) -> None:
        if event.error:  # the replica is out until it confirms a new subscription
            moved = self._pool.down(event.port)
            self._move(moved, event.port.address, event.error)
            event.port.release(sorted({*moved, *event.request_ids}))  # whatever it took, once it answers
            event.port.reconnect()
            return
        for rid in self._pool.confirm(event.port, event.request_ids):
            self._requests[rid].sampler = event.port.address  # from now on it is scheduled

    def _move(self, moved: list[str], address: str, reason: str) -> None:
        """These sequences lost their replica: their unanswered rows run again, and they go to
        the other replicas with the tokens sampled so far."""
        if not moved:
            return
        log.warning("sampler %s is down (%s); moving its %d sequences", address, reason, len(moved))
        for rid in moved:
            self._requests[rid].sampler = ""
        self._commit(self._scheduler.retry(moved))
        self.place([rid for rid in moved if rid in self._requests])
