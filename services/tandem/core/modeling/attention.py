"""Attention over a paged KV cache, for batched prefill of ragged prompts and batched decode.

A step is a list of sequences, each adding `num_new_tokens` after `num_computed_tokens`
already cached. Tokens of all sequences are packed into one [T] axis for the linear layers.

Decode steps (one new token per sequence) in float32 on CPU run cpu_attention's kernel, which
reads each sequence's blocks where they lie. Elsewhere (GPUs, other dtypes) they gather each
sequence's blocks per KV head, whole blocks at a time, into [kv_heads * B, context, head_dim] and run two batched matmuls with the
query heads of a group side by side; the context is padded to whole blocks and the padding
masked. On CPU, where every padded key costs a copy and a multiply, sequences of very different
lengths run in groups of similar length (each padded to its own longest) when that saves more
than the extra calls cost. Steps with longer queries run each sequence apart on CPU (its own
keys, SDPA's causal kernel for a fresh prompt); on GPUs they gather their keys through each
sequence's block table into a padded [B, max_context] view and run one masked
scaled-dot-product call.

On CPU the gathered keys and values go into buffers each thread keeps and every layer and step
reuses (`GatherBuffers`): a fresh tensor of megabytes per layer costs more in page faults and
allocation than the copy itself (32 sequences x 512 tokens: about 3 ms a gather against 0.6).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tandem.core.errors import InvalidArgumentError
from tandem.core.modeling import cpu_attention

# Decode attention on CPU reads the cache in place (cpu_attention) unless TANDEM_CPU_ATTENTION is
# "gather", which keeps the portable gather-and-matmul path (for comparison and as a fallback).
CPU_KERNEL = os.environ.get("TANDEM_CPU_ATTENTION", "kernel") != "gather"


@dataclass(frozen=True)
class SequenceSlice:
    """What one sequence contributes to a step."""

    num_computed_tokens: int  # tokens of this sequence already in the KV cache
    num_new_tokens: int  # tokens this step adds (the prompt, a chunk of it, or 1 in decode)
    block_table: Sequence[int]  # KV block ids holding positions [0, num_computed + num_new)


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


@dataclass(frozen=True)
class PrefillSequence:
    """One sequence of a step with longer queries, on CPU: its rows of the step and its keys."""

    start: int  # its first row in the step's [T] axis
    length: int  # its new tokens
    key_slots: torch.Tensor  # [context] int64 cache slot of each key it attends over
    mask: torch.Tensor | None  # [length, context] bool where a query may attend; None: causal, nothing cached before


@dataclass(frozen=True)
class AttentionMetadata:
    """Per-step tensors shared by every layer of a stage."""

    positions: torch.Tensor  # [T] int64 position of each new token
    slot_mapping: torch.Tensor  # [T] int64 cache slot (block * block_size + offset) each new token writes
    last_token_indices: torch.Tensor  # [B] int64 index in [T] of each sequence's last new token
    max_query_len: int
    block_size: int
    num_seqs: int
    # Decode steps (max_query_len 1):
    block_tables: torch.Tensor | None = None  # [B * max_blocks] int64 block ids, row by row, padded with 0
    key_bias: torch.Tensor | None = None  # [B, max_blocks * block_size] float32, 0 where the token may attend, else -inf
    groups: tuple[DecodeGroup, ...] = ()  # on CPU, when rows of very different lengths run apart
    context_lens: torch.Tensor | None = None  # [B] int64 keys each sequence attends over, its new one included
    sliding_window: int | None = None
    # Steps with longer queries:
    key_slots: torch.Tensor | None = None  # [B, max_context] int64 cache slot of each key, padded with 0
    mask: torch.Tensor | None = None  # [B, 1, max_query, max_context] bool, True where a query may attend
    query_index: torch.Tensor | None = None  # [T] int64 row of each token in the padded [B * max_query] layout
    prefill: tuple[PrefillSequence, ...] = ()  # on CPU instead of the padded layout: each sequence apart

    @property
    def is_decode(self) -> bool:
        return self.max_query_len == 1

    @classmethod
    def build(
        cls,
        seqs: Sequence[SequenceSlice],
        block_size: int,
        device: torch.device | str = "cpu",
        sliding_window: int | None = None,
    ) -> "AttentionMetadata":
        if not seqs:
            raise InvalidArgumentError("a step needs at least one sequence")
        query_lens = [s.num_new_tokens for s in seqs]
        context_lens = [s.num_computed_tokens + s.num_new_tokens for s in seqs]
        for i, (s, ctx) in enumerate(zip(seqs, context_lens)):
            if s.num_new_tokens < 1 or s.num_computed_tokens < 0:
                raise InvalidArgumentError(
                    f"sequence {i}: num_new_tokens must be >= 1 and num_computed_tokens >= 0, "
                    f"got {s.num_new_tokens} and {s.num_computed_tokens}"
                )
            if len(s.block_table) * block_size < ctx:
                raise InvalidArgumentError(
                    f"sequence {i}: block table of {len(s.block_table)} blocks holds "
                    f"{len(s.block_table) * block_size} tokens, needs {ctx}"
                )
        num_seqs, max_q, max_ctx = len(seqs), max(query_lens), max(context_lens)
        max_blocks = -(-max_ctx // block_size)
        tables = torch.zeros(num_seqs, max_blocks, dtype=torch.int64)
        for i, s in enumerate(seqs):
            n = min(len(s.block_table), max_blocks)
            tables[i, :n] = torch.as_tensor(list(s.block_table[:n]), dtype=torch.int64)

        computed = torch.tensor([s.num_computed_tokens for s in seqs])
        qlens = torch.tensor(query_lens)
        offsets = torch.arange(max_q)
        is_real = offsets[None, :] < qlens[:, None]  # [B, max_q]
        query_pos = torch.where(is_real, computed[:, None] + offsets[None, :], 0)  # padding attends key 0 only
        key_pos = torch.arange(max_blocks * block_size if max_q == 1 else max_ctx)
        mask = key_pos[None, None, :] <= query_pos[:, :, None]
        if sliding_window is not None:
            mask &= key_pos[None, None, :] > query_pos[:, :, None] - sliding_window

        positions = query_pos[is_real]  # [T], row-major: sequence by sequence
        seq_of_token = torch.arange(num_seqs)[:, None].expand(num_seqs, max_q)[is_real]
        slot_mapping = tables[seq_of_token, positions // block_size] * block_size + positions % block_size
        last_token_indices = torch.cumsum(qlens, 0) - 1
        device = torch.device(device)
        common: dict[str, Any] = dict(positions=_to(positions, device), slot_mapping=_to(slot_mapping, device),
                                      last_token_indices=_to(last_token_indices, device), max_query_len=max_q,
                                      block_size=block_size, num_seqs=num_seqs)
        if max_q == 1:
            key_bias = torch.zeros(mask.shape[0], mask.shape[2]).masked_fill_(~mask[:, 0], float("-inf"))
            groups = decode_groups([-(-c // block_size) for c in context_lens]) if device.type == "cpu" else []
            return cls(**common, block_tables=_to(tables.flatten(), device), key_bias=_to(key_bias, device),
                       context_lens=_to(torch.tensor(context_lens), device), sliding_window=sliding_window,
                       groups=tuple(_group(g, tables, key_bias, block_size) for g in groups) if len(groups) > 1 else ())
        if device.type == "cpu":
            return cls(**common, prefill=tuple(_prefill_sequences(seqs, tables, block_size, sliding_window)))
        key_slots = tables[:, key_pos // block_size] * block_size + key_pos % block_size  # [B, max_ctx]
        query_index = (torch.arange(num_seqs)[:, None] * max_q + offsets[None, :])[is_real]
        return cls(**common, key_slots=_to(key_slots, device), mask=_to(mask[:, None], device),
                   query_index=_to(query_index, device))


def _prefill_sequences(seqs: Sequence[SequenceSlice], tables: torch.Tensor, block_size: int,
                       sliding_window: int | None) -> list[PrefillSequence]:
    out, start = [], 0
    for i, s in enumerate(seqs):
        context = s.num_computed_tokens + s.num_new_tokens
        key_pos = torch.arange(context)
        slots = tables[i, key_pos // block_size] * block_size + key_pos % block_size
        mask = None
        if s.num_computed_tokens or (sliding_window is not None and context > sliding_window):
            query_pos = torch.arange(s.num_computed_tokens, context)[:, None]
            mask = key_pos[None, :] <= query_pos
            if sliding_window is not None:
                mask &= key_pos[None, :] > query_pos - sliding_window
        out.append(PrefillSequence(start, s.num_new_tokens, slots, mask))
        start += s.num_new_tokens
    return out


def _group(rows: list[int], tables: torch.Tensor, key_bias: torch.Tensor, block_size: int) -> DecodeGroup:
    """The decode group of `rows`, cut from the whole step's tables and key bias [B, max_blocks *
    block_size] to its own longest context (the cut-off columns are padding for these rows)."""
    index = torch.tensor(rows)
    bias = key_bias[index]
    real = torch.isfinite(bias).any(0).nonzero()
    blocks = -(-(int(real[-1]) + 1) // block_size)
    return DecodeGroup(index, tables[index, :blocks].flatten(), bias[:, :blocks * block_size].contiguous())


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; to a GPU through pinned memory, without waiting for the copy (it is
    ordered on the current stream, and torch keeps the pinned source until the copy is done)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


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


def _gather(name: str, source: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """source.index_select(dim, index); on CPU into this thread's buffer `name` (see GatherBuffers)."""
    if source.device.type != "cpu":
        return source.index_select(dim, index)
    shape = list(source.shape)
    shape[dim] = index.numel()
    return torch.index_select(source, dim, index, out=_BUFFERS.take(name, shape, source))


def write_kv(keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             meta: AttentionMetadata) -> None:
    """Store the step's new keys and values k, v [T, kv_heads, head_dim] into one layer's cache
    (keys, values [kv_heads, slots, head_dim]) at their slots."""
    keys.index_copy_(1, meta.slot_mapping, k.transpose(0, 1).to(keys.dtype))
    values.index_copy_(1, meta.slot_mapping, v.transpose(0, 1).to(values.dtype))


def paged_attention(
    q: torch.Tensor,  # [T, heads, head_dim]
    keys: torch.Tensor,  # [kv_heads, slots, head_dim] one layer's key cache, new keys already written
    values: torch.Tensor,  # [kv_heads, slots, head_dim]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of the new tokens over their sequences' cached context -> [T, heads, head_dim]."""
    if meta.is_decode:
        return decode_attention(q, keys, values, meta, scale)
    if meta.prefill:
        return _prefill_apart(q, keys, values, meta.prefill, scale)
    num_tokens, num_heads, head_dim = q.shape
    b, max_q = meta.num_seqs, meta.max_query_len
    slots = meta.key_slots.flatten()
    kv_heads, head_dim = keys.shape[0], keys.shape[2]
    k = _gather("k", keys, 1, slots).view(kv_heads, b, -1, head_dim).transpose(0, 1)  # [B, kv_heads, max_ctx, head_dim]
    v = _gather("v", values, 1, slots).view(kv_heads, b, -1, head_dim).transpose(0, 1)
    padded = q.new_zeros(b * max_q, num_heads, head_dim)
    padded[meta.query_index] = q
    padded = padded.view(b, max_q, num_heads, head_dim).transpose(1, 2)  # [B, heads, max_q, head_dim]
    out = F.scaled_dot_product_attention(padded, k, v, attn_mask=meta.mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2).reshape(b * max_q, num_heads, head_dim)[meta.query_index]


def _prefill_apart(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   sequences: tuple[PrefillSequence, ...], scale: float) -> torch.Tensor:
    """Each sequence's queries over its own keys, unpadded; a fresh prompt through SDPA's causal
    kernel, which never builds the scores of masked keys."""
    out = torch.empty_like(q)
    for p in sequences:
        rows = slice(p.start, p.start + p.length)
        k = keys.index_select(1, p.key_slots)[None]  # [1, kv_heads, context, head_dim]
        v = values.index_select(1, p.key_slots)[None]
        attended = F.scaled_dot_product_attention(q[rows].transpose(0, 1)[None], k, v, attn_mask=p.mask,
                                                  is_causal=p.mask is None, scale=scale, enable_gqa=True)
        out[rows] = attended[0].transpose(0, 1)
    return out


def decode_attention(
    q: torch.Tensor,  # [B, heads, head_dim], one new token per sequence
    keys: torch.Tensor,  # [kv_heads, slots, head_dim]
    values: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence over its whole blocks -> [B, heads, head_dim]."""
    if meta.context_lens is not None and CPU_KERNEL and cpu_attention.supports(q, keys):
        assert meta.block_tables is not None
        return cpu_attention.decode_attention(q, keys, values, meta.block_tables.view(meta.num_seqs, -1),
                                              meta.context_lens, meta.block_size, scale, meta.sliding_window)
    if meta.groups:
        out = torch.empty_like(q)
        for g in meta.groups:
            out.index_copy_(0, g.rows, _decode(q.index_select(0, g.rows), keys, values, g.block_tables, g.key_bias,
                                               meta.block_size, scale))
        return out
    assert meta.block_tables is not None and meta.key_bias is not None
    return _decode(q, keys, values, meta.block_tables, meta.key_bias, meta.block_size, scale)


def _decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, block_tables: torch.Tensor,
            key_bias: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    kv_heads, _, head_dim = keys.shape
    b, num_heads = q.shape[:2]
    group, context = num_heads // kv_heads, key_bias.shape[1]
    blocks = keys.view(kv_heads, -1, block_size, head_dim)
    k = _gather("k", blocks, 1, block_tables).view(kv_heads * b, context, head_dim)
    v = _gather("v", values.view(blocks.shape), 1, block_tables).view(kv_heads * b, context, head_dim)
    qg = q.view(b, kv_heads, group, head_dim).transpose(0, 1).reshape(kv_heads * b, group, head_dim)
    scores = torch.bmm(qg, k.transpose(1, 2)).view(kv_heads, b, group, context)
    scores = scores.float().mul_(scale).add_(key_bias[None, :, None, :])
    probs = torch.softmax(scores, dim=-1).to(q.dtype).view(kv_heads * b, group, context)
    out = torch.bmm(probs, v)  # [kv_heads * B, group, head_dim]
    return out.view(kv_heads, b, group, head_dim).transpose(0, 1).reshape(b, num_heads, head_dim)
