"""The portable decode path: each sequence's blocks gathered into a padded copy, then two
batched matmuls.

GPUs, float16 and bfloat16 run decode steps here (float32 on CPU runs cpu_attention's kernel,
unless TANDEM_CPU_ATTENTION is "gather"). Each sequence's blocks are gathered per KV head, whole
blocks at a time, into [kv_heads * B, context, head_dim], and the query heads of a group run side
by side in two batched matmuls; the context is padded to whole blocks and the padding masked by
a key bias (0 where a key may be attended, -inf elsewhere). On CPU, where every padded key costs
a copy and a multiply, sequences of very different lengths run in groups of similar length
(each padded to its own longest) when that saves more than the extra calls cost.

The key bias and the groups are built on first use and kept with the step's metadata
(`AttentionMetadata.gather_key_bias`, `gather_groups`), so that a step the kernel serves never
builds them; on GPUs the key bias is built with the step's inputs (CUDA graphs copy it into
their static buffers).

On CPU the gathered keys and values go into buffers each thread keeps and every layer and step
reuses (`GatherBuffers`): a fresh tensor of megabytes per layer costs more in page faults and
allocation than the copy itself (32 sequences x 512 tokens: about 3 ms a gather against 0.6).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tandem.core.modeling.attention import AttentionMetadata

# A decode group's fixed cost (its own gathers, matmuls and softmax in every layer), in units of
# one sequence's block of padded keys; measured on this project's CPUs at about 40.
GROUP_COST_BLOCKS = 40


@dataclass(frozen=True)
class DecodeGroup:
    """Decode rows of similar context, padded to the longest among them."""

    rows: torch.Tensor  # [b] int64 rows of the step, ascending
    block_tables: torch.Tensor  # [b * max_blocks] int64
    key_bias: torch.Tensor  # [b, max_blocks * block_size] float32


def decode_groups(num_blocks: Sequence[int], overhead: int | None = None) -> list[list[int]]:
    """Rows of a decode step (each holding num_blocks[i] blocks) split into groups of similar
    length, so that the padded blocks plus `overhead` a group are fewest: rows sorted by length,
    cut greedily where the next row would more than double the group's padding, then neighbours
    merged while that is cheaper. One group (every row) when splitting saves nothing."""
    overhead = GROUP_COST_BLOCKS if overhead is None else overhead
    order = sorted(range(len(num_blocks)), key=lambda i: num_blocks[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and num_blocks[i] <= 2 * num_blocks[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])

    def cost(g: list[int]) -> int:
        return len(g) * max(num_blocks[i] for i in g) + overhead

    merged = True
    while merged and len(groups) > 1:
        merged = False
        for k in range(len(groups) - 1):
            if cost(groups[k] + groups[k + 1]) <= cost(groups[k]) + cost(groups[k + 1]):
                groups[k:k + 2] = [groups[k] + groups[k + 1]]
                merged = True
                break
    return [sorted(g) for g in groups]


def build_key_bias(context_lens: torch.Tensor, width: int, sliding_window: int | None) -> torch.Tensor:
    """[B, width] float32: 0 for the keys each sequence's new token attends (its whole context,
    or the last `sliding_window` of it), -inf for the rest and the padding."""
    key_pos = torch.arange(width, device=context_lens.device)[None, :]
    query_pos = context_lens[:, None] - 1
    mask = key_pos <= query_pos
    if sliding_window is not None:
        mask &= key_pos > query_pos - sliding_window
    return torch.zeros(mask.shape, device=context_lens.device).masked_fill_(~mask, float("-inf"))


def group_rows(meta: AttentionMetadata) -> tuple[DecodeGroup, ...]:
    """On CPU, a decode step's rows in groups of similar length; () when one group serves best."""
    if meta.block_tables is None or meta.block_tables.device.type != "cpu" or meta.context_lens is None:
        return ()
    lens = meta.context_lens.tolist()
    found = decode_groups([-(-n // meta.block_size) for n in lens])
    if len(found) < 2:
        return ()
    tables, bias = meta.block_tables.view(meta.num_seqs, -1), meta.gather_key_bias
    return tuple(_group(rows, lens, tables, bias, meta.block_size) for rows in found)


def _group(rows: list[int], lens: list[int], tables: torch.Tensor, bias: torch.Tensor, block_size: int) -> DecodeGroup:
    """The decode group of `rows`, cut from the whole step's tables and key bias [B, max_blocks *
    block_size] to its own longest context (the cut-off columns are padding for these rows)."""
    index = torch.tensor(rows)
    blocks = -(-max(lens[i] for i in rows) // block_size)
    return DecodeGroup(index, tables[index, :blocks].flatten(), bias[index, :blocks * block_size].contiguous())


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, meta: AttentionMetadata,
                     scale: float) -> torch.Tensor:
    """q [B, heads, head_dim] over each sequence's whole blocks of keys, values [kv_heads, slots,
    head_dim] -> [B, heads, head_dim]."""
    groups = meta.gather_groups
    if groups:
        out = torch.empty_like(q)
        for g in groups:
            out.index_copy_(0, g.rows, _decode(q.index_select(0, g.rows), keys, values, g.block_tables, g.key_bias,
                                               meta.block_size, scale))
        return out
    assert meta.block_tables is not None
    return _decode(q, keys, values, meta.block_tables, meta.gather_key_bias, meta.block_size, scale)


def _decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, block_tables: torch.Tensor,
            bias: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    kv_heads, _, head_dim = keys.shape
    b, num_heads = q.shape[:2]
    group, context = num_heads // kv_heads, bias.shape[1]
    blocks = keys.view(kv_heads, -1, block_size, head_dim)
    k = gather("k", blocks, 1, block_tables).view(kv_heads * b, context, head_dim)
    v = gather("v", values.view(blocks.shape), 1, block_tables).view(kv_heads * b, context, head_dim)
    qg = q.view(b, kv_heads, group, head_dim).transpose(0, 1).reshape(kv_heads * b, group, head_dim)
    scores = torch.bmm(qg, k.transpose(1, 2)).view(kv_heads, b, group, context)
    scores = scores.float().mul_(scale).add_(bias[None, :, None, :])
    probs = torch.softmax(scores, dim=-1).to(q.dtype).view(kv_heads * b, group, context)
    out = torch.bmm(probs, v)  # [kv_heads * B, group, head_dim]
    return out.view(kv_heads, b, group, head_dim).transpose(0, 1).reshape(b, num_heads, head_dim)


class GatherBuffers(threading.local):
    """Per thread, one growing buffer per name; `take` gives a tensor of `shape` over its start.
    What a caller takes is valid until it takes the same name again."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        numel = 1
        for n in shape:
            numel *= n
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = self._buffers[name] = torch.empty(max(numel, numel * 5 // 4), dtype=like.dtype, device=like.device)
        return buffer[:numel].view(*shape)


_BUFFERS = GatherBuffers()


def gather(name: str, source: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """source.index_select(dim, index); on CPU into this thread's buffer `name` (see GatherBuffers)."""
    if source.device.type != "cpu":
        return source.index_select(dim, index)
    shape = list(source.shape)
    shape[dim] = index.numel()
    return torch.index_select(source, dim, index, out=_BUFFERS.take(name, shape, source))
