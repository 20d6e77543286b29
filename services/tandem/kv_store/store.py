"""BlockStore: KV blocks of swapped-out sequences, keyed by (request, stage), in host memory.

Pure and gRPC-free. The store holds whatever tensors it is given (callers pass tensors they
own), counts their bytes against a fixed capacity, and is safe to use from many threads.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from tandem.core.errors import InvalidArgumentError, NotFoundError, ResourceExhaustedError

# Layout of one stage's blocks: [num_blocks, layers, 2, block_size, kv_heads, head_dim].
BLOCKS_RANK = 6
KV_AXIS = 2


@dataclass(frozen=True)
class StoreUsage:
    """A consistent snapshot of the store's figures."""

    capacity_bytes: int
    """Most bytes the store may hold."""
    used_bytes: int
    """Bytes held."""
    num_requests: int
    """Requests with blocks held on at least one stage."""
    num_entries: int
    """(request, stage) entries held."""

    @property
    def free_bytes(self) -> int:
        """Bytes still available."""
        return self.capacity_bytes - self.used_bytes


class BlockStore:
    """Holds each (request, stage)'s KV blocks as one tensor, within `capacity_bytes`."""

    def __init__(self, capacity_bytes: int):
        if capacity_bytes < 0:
            raise InvalidArgumentError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._blocks: dict[str, dict[int, torch.Tensor]] = {}  # request -> stage -> blocks
        self._used_bytes = 0
        self._lock = threading.Lock()

    def put(self, request_id: str, stage: int, blocks: torch.Tensor) -> None:
        """Store `blocks` [num_blocks, layers, 2, block_size, kv_heads, head_dim] of a stage.

        The store keeps `blocks` itself (no copy): pass a tensor nothing else writes to.
        Raises InvalidArgumentError for a bad key or layout or a (request, stage) already
        held, and ResourceExhaustedError when the blocks do not fit in the free bytes.
        """
        _check_key(request_id, stage)
        _check_layout(blocks)
        num_bytes = _num_bytes(blocks)
        with self._lock:
            stages = self._blocks.get(request_id, {})
            if stage in stages:
                raise InvalidArgumentError(
                    f"request {request_id!r} already has blocks on stage {stage}; "
                    "get or free them before putting new ones"
                )
            free_bytes = self.capacity_bytes - self._used_bytes
            if num_bytes > free_bytes:
                raise ResourceExhaustedError(
                    f"KV store full: request {request_id!r} stage {stage} needs {num_bytes} "
                    f"bytes, {free_bytes} of {self.capacity_bytes} bytes are free"
                )
            self._blocks.setdefault(request_id, stages)[stage] = blocks
            self._used_bytes += num_bytes

    def get(self, request_id: str, stage: int, keep: bool = False) -> torch.Tensor:
        """The blocks of (request, stage); dropped from the store unless `keep`.

        Raises NotFoundError naming the request and stage when none are held.
        """
        _check_key(request_id, stage)
        with self._lock:
            stages = self._blocks.get(request_id)
            if stages is None or stage not in stages:
                raise NotFoundError(f"no KV blocks held for request {request_id!r} stage {stage}")
            if keep:
                return stages[stage]
            blocks = stages.pop(stage)
            if not stages:
                del self._blocks[request_id]
            self._used_bytes -= _num_bytes(blocks)
            return blocks

    def free(self, request_ids: Iterable[str]) -> int:
        """Drop every stage's blocks of `request_ids` (unknown ids are ignored); bytes freed."""
        freed_bytes = 0
        with self._lock:
            for request_id in request_ids:
                for blocks in self._blocks.pop(request_id, {}).values():
                    freed_bytes += _num_bytes(blocks)
            self._used_bytes -= freed_bytes
        return freed_bytes

    def usage(self) -> StoreUsage:
        """Capacity, bytes held, requests and entries, read together."""
        with self._lock:
            return StoreUsage(
                capacity_bytes=self.capacity_bytes,
                used_bytes=self._used_bytes,
                num_requests=len(self._blocks),
                num_entries=sum(len(stages) for stages in self._blocks.values()),
            )

    def __contains__(self, key: tuple[str, int]) -> bool:
        request_id, stage = key
        with self._lock:
            return stage in self._blocks.get(request_id, {})


def _num_bytes(blocks: torch.Tensor) -> int:
    return blocks.numel() * blocks.element_size()


def _check_key(request_id: str, stage: int) -> None:
    if not request_id:
        raise InvalidArgumentError("request_id is empty")
    if stage < 0:
        raise InvalidArgumentError(f"stage must be >= 0, got {stage}")


def _check_layout(blocks: torch.Tensor) -> None:
    shape = list(blocks.shape)
    if blocks.dim() != BLOCKS_RANK or shape[KV_AXIS] != 2:
        raise InvalidArgumentError(
            f"blocks have shape {shape}; expected [num_blocks, layers, 2, block_size, "
            "kv_heads, head_dim]"
        )
