"""The paged KV cache of one stage (core.block_pool hands out its blocks)."""

from __future__ import annotations

import torch


class PagedKVCache:
    """Key and value blocks for a stage's layers: [layers, 2, kv_heads, blocks * block_size, head_dim].

    Head-major, so that gathering a step's blocks for one KV head yields [sequences, context,
    head_dim] already laid out for a batched matmul (see decode_gather.decode_attention). Blocks
    leave and enter the stage (swap to the KV store) as [n, layers, 2, block_size, kv_heads,
    head_dim] whatever this layout is: `read_blocks` and `write_blocks` convert.
    """

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
        self.data = torch.zeros(num_layers, 2, num_kv_heads, num_blocks * block_size, head_dim, dtype=dtype,
                                device=device)

    def layer(self, local_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of one layer, each [kv_heads, blocks * block_size, head_dim]."""
        kv = self.data[local_index]
        return kv[0], kv[1]

    @property
    def block_shape(self) -> tuple[int, ...]:
        """Shape of one block as it is swapped: [layers, 2, block_size, kv_heads, head_dim]."""
        layers, _, kv_heads, _, head_dim = self.data.shape
        return layers, 2, self.block_size, kv_heads, head_dim

    def _blocked(self) -> torch.Tensor:  # [layers, 2, kv_heads, blocks, block_size, head_dim]
        layers, _, kv_heads, _, head_dim = self.data.shape
        return self.data.view(layers, 2, kv_heads, self.num_blocks, self.block_size, head_dim)

    def read_blocks(self, block_ids: torch.Tensor) -> torch.Tensor:
        """Copies of the blocks `block_ids` [n] -> [n, layers, 2, block_size, kv_heads, head_dim]."""
        return self._blocked()[:, :, :, block_ids].permute(3, 0, 1, 4, 2, 5).contiguous()

    def write_blocks(self, block_ids: torch.Tensor, blocks: torch.Tensor) -> None:
        """Store `blocks` [n, layers, 2, block_size, kv_heads, head_dim] into blocks `block_ids` [n]."""
        self._blocked()[:, :, :, block_ids] = blocks.to(self.data.device, self.data.dtype).permute(1, 2, 4, 0, 3, 5)
