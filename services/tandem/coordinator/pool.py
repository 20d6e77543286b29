"""The sampler pool: which replica holds which sequence. Bookkeeping only; each method returns
what the loop must do (the sequences to hand to a replica, the sequences that lost theirs).

A replica takes sequences once its Results stream is confirmed (up). When it goes down or
leaves the pool, every sequence it held or was being handed comes back to the loop, which
runs their unanswered rows again and places them elsewhere.

One replica may be hosted by the last stage itself (`hosted`): it samples next to the logits,
so its rows never cross to another process. It takes the sequences that need only an argmax
(the loop says which), the CPU replicas take the rest; with no CPU replica up it takes every
sequence, and with it down the argmax sequences go to the CPU replicas like any other.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from tandem.coordinator.ports import SamplerPort


@dataclass(eq=False)
class Replica:
    port: SamplerPort
    is_up: bool = False
    request_ids: set[str] = field(default_factory=set)  # the sequences it holds or is being handed


class SamplerPool:
    def __init__(self, hosted: str = "") -> None:
        self.hosted = hosted  # address of the last stage's own sampler; empty: none
        self.replicas: dict[str, Replica] = {}
        self._holders: dict[str, Replica] = {}

    @property
    def addresses_up(self) -> tuple[str, ...]:
        return tuple(a for a, r in self.replicas.items() if r.is_up)

    def port(self, address: str) -> SamplerPort | None:
        """The port of the replica at `address` while it is up."""
        replica = self.replicas.get(address)
        return replica.port if replica is not None and replica.is_up else None

    def has_placed(self, request_id: str) -> bool:
        return request_id in self._holders

    def join(self, port: SamplerPort) -> None:
        self.replicas[port.address] = Replica(port)

    def leave(self, address: str) -> tuple[SamplerPort, list[str]]:
        """Remove a replica: its port (for the caller to close) and the sequences it had."""
        replica = self.replicas[address]
        moved = self.down(replica.port)
        del self.replicas[address]
        return replica.port, moved

    def up(self, port: SamplerPort) -> bool:
        """Mark the replica up; False if it is not in the pool (any more) or was up already."""
        replica = self.replicas.get(port.address)
        if replica is None or replica.port is not port or replica.is_up:
            return False
        replica.is_up = True
        return True

    def down(self, port: SamplerPort) -> list[str]:
        """The replica holds nothing from now on: the sequences it had, to move."""
        replica = self.replicas.get(port.address)
        if replica is None or replica.port is not port or not replica.is_up:
            return []
        replica.is_up = False
        moved, replica.request_ids = sorted(replica.request_ids), set()
        for rid in moved:
            del self._holders[rid]
        return moved

    def place(self, request_ids: list[str], argmax_only: Callable[[str], bool] = lambda rid: False
              ) -> dict[SamplerPort, list[str]]:
        """Give each sequence to a replica that is up: an argmax-only one to the hosted replica,
        any other to the least loaded CPU replica (the hosted one when no CPU replica is up);
        with none up they wait."""
        hosted = self.replicas.get(self.hosted)
        hosted = hosted if hosted is not None and hosted.is_up else None
        cpu = [r for r in self.replicas.values() if r.is_up and r is not hosted]
        groups: dict[SamplerPort, list[str]] = defaultdict(list)
        if hosted is None and not cpu:
            return groups
        for rid in request_ids:
            if hosted is not None and (not cpu or argmax_only(rid)):
                replica = hosted
            else:
                replica = min(cpu, key=lambda r: len(r.request_ids))
            replica.request_ids.add(rid)
            self._holders[rid] = replica
            groups[replica.port].append(rid)
        return groups

    def confirm(self, port: SamplerPort, request_ids: tuple[str, ...]) -> list[str]:
        """Of the sequences a replica says it now holds, those still placed on it."""
        replica = self.replicas.get(port.address)
        if replica is None or replica.port is not port:
            return []
        return [rid for rid in request_ids if self._holders.get(rid) is replica]

    def release(self, request_id: str) -> SamplerPort | None:
        """Forget a finished sequence; the port of the replica that must release it, if up."""
        replica = self._holders.pop(request_id, None)
        if replica is None:
            return None
        replica.request_ids.discard(request_id)
        return replica.port if replica.is_up else None
