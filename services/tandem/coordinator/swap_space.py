"""The KV store's host blocks as the scheduler counts them: which sequences are swapped out, in
the order they left, and how many blocks each holds there. Pure bookkeeping, no I/O."""

from __future__ import annotations


class SwapSpace:
    def __init__(self, num_blocks: int):
        self.num_free = num_blocks
        self._held: dict[str, int] = {}  # request id -> its host blocks, in swap-out order

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._held

    @property
    def first(self) -> str:
        """The sequence swapped out longest ago (there must be one)."""
        return next(iter(self._held))

    def num_blocks_of(self, request_id: str) -> int:
        return self._held[request_id]

    def can_hold(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free

    def put(self, request_id: str, num_blocks: int) -> None:
        self._held[request_id] = num_blocks
        self.num_free -= num_blocks

    def take(self, request_id: str) -> int:
        """The sequence leaves the host (swapped back in, or ended): its block count."""
        num_blocks = self._held.pop(request_id)
        self.num_free += num_blocks
        return num_blocks

    def clear(self) -> list[str]:
        """Every sequence leaves the host; returns them."""
        request_ids = list(self._held)
        self.num_free += sum(self._held.values())
        self._held.clear()
        return request_ids
