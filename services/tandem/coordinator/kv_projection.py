"""The KV memory TD-Pipe's admission projects (../shared/TECHNIQUES.md, "TD-Pipe"), as pure
functions: every running request is taken to grow by one token a step until its predicted output
length, and a prompt is admitted while the blocks projected at each checkpoint ahead stay under
a share of the pool. coordinator/td_pipe.py decides the phases with it; the scheduler checks each
prompt it admits against a `Projection`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from tandem.coordinator.steps import Sequence as Seq

# Steps ahead at which the KV peak is projected, as TD-Pipe's code does: 5, 8, then powers of two.
CHECKPOINTS = (5, 8, *(1 << k for k in range(4, 13)))
MEMORY_SHARE = 0.9  # admit while the projected peak stays under this share of the blocks


@dataclass(frozen=True)
class Running:
    """A request holding KV: tokens it has now, and output tokens it is predicted still to make."""

    num_tokens: int
    predicted_remaining: int


def projected_peak(running: Sequence[Running], block_size: int, checkpoints: Sequence[int] = CHECKPOINTS) -> int:
    """Most KV blocks the requests will hold at once, now or at any checkpoint ahead: at +m steps
    each request still generating (predicted remaining >= m) holds ceil((tokens + m) / block_size)."""
    def blocks_at(m: int) -> int:
        return sum(-(-(r.num_tokens + m) // block_size) for r in running if m == 0 or r.predicted_remaining >= m)

    return max(blocks_at(m) for m in (0, *checkpoints))


def admits(running: Sequence[Running], candidate: Running, num_blocks: int, block_size: int,
           share: float = MEMORY_SHARE) -> bool:
    """Whether one more prefill (`candidate`: its prompt and predicted output) keeps the projected
    peak under `share` of `num_blocks` (the rule the scheduler applies through `Projection`)."""
    return Projection(running, block_size, share * num_blocks).fits(candidate)


class Projection:
    """The KV blocks projected at now and each checkpoint for a set of running requests, kept up
    to date as prompts are admitted one by one (what `projected_peak` computes from scratch)."""

    def __init__(self, running: Iterable[Running], block_size: int, limit: float,
                 checkpoints: Sequence[int] = CHECKPOINTS, free_blocks: int | None = None):
        """`free_blocks`, when given: the blocks an allocation can take now; a prompt then fits
        only if its blocks are among them as well (each admitted one takes its share)."""
        self.block_size, self.limit, self.steps = block_size, limit, (0, *checkpoints)
        self.blocks = [0] * len(self.steps)
        self.num_running = 0
        self.free_blocks: int | None = None
        for r in running:
            self.add(r)
        self.free_blocks = free_blocks

    def _blocks(self, r: Running) -> list[int]:
        return [-(-(r.num_tokens + m) // self.block_size) if m == 0 or r.predicted_remaining >= m else 0
                for m in self.steps]

    @property
    def peak(self) -> int:
        return max(self.blocks)

    def fits(self, candidate: Running) -> bool:
        """Whether the peak with `candidate` admitted stays under the limit (and its blocks now
        are free, where the free blocks are known)."""
        needed = self._blocks(candidate)
        if self.free_blocks is not None and needed[0] > self.free_blocks:
            return False
        return max(b + c for b, c in zip(self.blocks, needed)) < self.limit

    def fits_or_alone(self, candidate: Running) -> bool:
        """`fits`, or nothing runs: then any prompt may (the block pool alone decides), or one
        longer than the projection allows would never run."""
        return self.num_running == 0 or self.fits(candidate)

    def add(self, r: Running) -> None:
        added = self._blocks(r)
        self.blocks = [b + c for b, c in zip(self.blocks, added)]
        self.num_running += 1
        if self.free_blocks is not None:
            self.free_blocks -= added[0]


def as_running(seq: Seq) -> Running:
    """A sequence as the projection sees it: its tokens now, and the output still predicted."""
    return Running(seq.num_tokens, max(0, seq.predicted_output_len - len(seq.output_ids)))


def head_of_line(seqs: Mapping[str, Seq], waiting: Sequence[str]) -> Running | None:
    """The first waiting prompt as the projection sees it; None when none waits."""
    return as_running(seqs[waiting[0]]) if waiting else None
