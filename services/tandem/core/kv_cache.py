"""The paged KV cache of one stage, and the block allocator that hands out its blocks."""

from __future__ import annotations

import torch

from tandem.core.errors import ResourceExhaustedError


class BlockAllocator:
    """Hands out KV block ids from a fixed pool; the coordinator owns one of these."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        if not self.can_allocate(num_blocks):
            raise ResourceExhaustedError(f"need {num_blocks} KV blocks, {len(self._free)} free")
        return [self._free.pop() for _ in range(num_blocks)]

    def free(self, block_ids: list[int]) -> None:
        self._free.extend(reversed(block_ids))


class PagedKVCache:
    """Key and value blocks for a stage's layers: [layers, 2, blocks, block_size, kv_heads, head_dim]."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.data = torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)

    def layer(self, local_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of one layer, each [blocks * block_size, kv_heads, head_dim]."""
        kv = self.data[local_index]
        return kv[0].flatten(0, 1), kv[1].flatten(0, 1)
