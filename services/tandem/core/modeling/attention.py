"""Attention over a paged KV cache, for batched prefill of ragged prompts and batched decode.

A step is a list of sequences, each adding `num_new_tokens` after `num_computed_tokens`
already cached. Tokens of all sequences are packed into one [T] axis for the linear layers.

Decode steps (one new token per sequence) in float32 on CPU run cpu_attention's kernel, which
reads each sequence's blocks where they lie; elsewhere (GPUs, other dtypes) they take
decode_gather's portable path. Steps with longer queries run each sequence apart on CPU (its own
keys, SDPA's causal kernel for a fresh prompt); on GPUs they gather their keys through each
sequence's block table into a padded [B, max_context] view and run one masked
scaled-dot-product call.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tandem.core.errors import InvalidArgumentError
from tandem.core.modeling import cpu_attention, decode_gather
from tandem.core.modeling.decode_gather import DecodeGroup, gather
from tandem.core.modeling.rope import apply_rotary

# Decode attention on CPU reads the cache in place (cpu_attention) unless TANDEM_CPU_ATTENTION is
# "gather", which keeps the portable gather-and-matmul path (for comparison and as a fallback).
CPU_KERNEL = os.environ.get("TANDEM_CPU_ATTENTION", "kernel") != "gather"


@dataclass(frozen=True)
class SequenceSlice:
    """What one sequence contributes to a step."""

    num_computed_tokens: int  # tokens of this sequence already in the KV cache
    num_new_tokens: int  # tokens this step adds (the prompt, a chunk of it, or 1 in decode)
    block_table: Sequence[int]  # KV block ids holding positions [0, num_computed + num_new)


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
    key_bias: torch.Tensor | None = None  # [B, max_blocks * block_size] float32 when given (see decode_gather)
    groups: tuple[DecodeGroup, ...] = ()  # rows in groups of similar length, when given (see decode_gather)
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

    @property
    def max_blocks(self) -> int:
        """Blocks of each row of a decode step's block tables."""
        assert self.block_tables is not None
        return self.block_tables.numel() // self.num_seqs

    # The gather path's inputs (decode_gather), built on first use and kept for every layer of the
    # step: a step the CPU kernel serves never builds them.
    @functools.cached_property
    def gather_key_bias(self) -> torch.Tensor:
        """A decode step's key bias: `key_bias` when given, else from the context lengths."""
        if self.key_bias is not None:
            return self.key_bias
        assert self.context_lens is not None
        return decode_gather.build_key_bias(self.context_lens, self.max_blocks * self.block_size, self.sliding_window)

    @functools.cached_property
    def gather_groups(self) -> tuple[DecodeGroup, ...]:
        """A decode step's rows in groups of similar length: `groups` when given, else on CPU
        those decode_gather finds; () when one group serves best."""
        return self.groups or decode_gather.group_rows(self)

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
        device = torch.device(device)
        if max(query_lens) == 1:
            return cls._build_decode(seqs, context_lens, block_size, device, sliding_window)
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
        key_pos = torch.arange(max_ctx)
        mask = key_pos[None, None, :] <= query_pos[:, :, None]
        if sliding_window is not None:
            mask &= key_pos[None, None, :] > query_pos[:, :, None] - sliding_window

        positions = query_pos[is_real]  # [T], row-major: sequence by sequence
        seq_of_token = torch.arange(num_seqs)[:, None].expand(num_seqs, max_q)[is_real]
        slot_mapping = tables[seq_of_token, positions // block_size] * block_size + positions % block_size
        last_token_indices = torch.cumsum(qlens, 0) - 1
        common: dict[str, Any] = dict(positions=_to(positions, device), slot_mapping=_to(slot_mapping, device),
                                      last_token_indices=_to(last_token_indices, device), max_query_len=max_q,
                                      block_size=block_size, num_seqs=num_seqs)
        if device.type == "cpu":
            return cls(**common, prefill=tuple(_prefill_sequences(seqs, tables, block_size, sliding_window)))
        key_slots = tables[:, key_pos // block_size] * block_size + key_pos % block_size  # [B, max_ctx]
        query_index = (torch.arange(num_seqs)[:, None] * max_q + offsets[None, :])[is_real]
        return cls(**common, key_slots=_to(key_slots, device), mask=_to(mask[:, None], device),
                   query_index=_to(query_index, device))

    @classmethod
    def _build_decode(cls, seqs: Sequence[SequenceSlice], context_lens: list[int], block_size: int,
                      device: torch.device, sliding_window: int | None) -> "AttentionMetadata":
        """One new token a sequence: block tables padded with block 0, in plain Python and one
        tensor a field (this runs for every decode step, on the way to the forward pass)."""
        max_blocks = -(-max(context_lens) // block_size)
        rows, slots = [], []
        for s, n in zip(seqs, context_lens):
            row = list(s.block_table[:max_blocks])
            row += [0] * (max_blocks - len(row))
            rows.append(row)
            slots.append(row[(n - 1) // block_size] * block_size + (n - 1) % block_size)
        lens = torch.tensor(context_lens, dtype=torch.int64)
        meta = cls(positions=_to(lens - 1, device), slot_mapping=_to(torch.tensor(slots, dtype=torch.int64), device),
                   last_token_indices=_to(torch.arange(len(seqs)), device), max_query_len=1, block_size=block_size,
                   num_seqs=len(seqs), block_tables=_to(torch.tensor(rows, dtype=torch.int64).flatten(), device),
                   context_lens=_to(lens, device), sliding_window=sliding_window)
        if device.type != "cpu":  # built now, while the inputs are prepared: CUDA graphs copy it
            meta.gather_key_bias  # noqa: B018
        return meta


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


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; to a GPU through pinned memory, without waiting for the copy (it is
    ordered on the current stream, and torch keeps the pinned source until the copy is done)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def attend(
    qkv: torch.Tensor,  # [T, (heads + 2 * kv_heads) * head_dim] the fused q/k/v projection
    cos_sin: tuple[torch.Tensor, torch.Tensor],  # [T, 1, head_dim] each
    keys: torch.Tensor,  # [kv_heads, slots, head_dim] one layer's cache
    values: torch.Tensor,
    meta: AttentionMetadata,
    num_heads: int,
    scale: float,
) -> torch.Tensor:
    """One layer's attention from its q/k/v projection: rotary embedding on q and k, the step's
    keys and values into the cache, attention over each sequence's context -> [T, heads * head_dim].
    A float32 decode step on CPU does all of it in cpu_attention's one pass."""
    kv_heads, _, head_dim = keys.shape
    t = qkv.shape[0]
    if meta.is_decode and meta.context_lens is not None and CPU_KERNEL and cpu_attention.supports(qkv, keys):
        assert meta.block_tables is not None
        return cpu_attention.decode_step(qkv, *cos_sin, keys, values, meta.slot_mapping,
                                         meta.block_tables.view(meta.num_seqs, -1), meta.context_lens,
                                         meta.block_size, num_heads, scale, meta.sliding_window)
    qk = apply_rotary(qkv[:, : (num_heads + kv_heads) * head_dim].view(t, num_heads + kv_heads, head_dim), *cos_sin)
    v = qkv[:, (num_heads + kv_heads) * head_dim :].view(t, kv_heads, head_dim)
    write_kv(keys, values, qk[:, num_heads:], v, meta)
    return paged_attention(qk[:, :num_heads], keys, values, meta, scale).reshape(t, num_heads * head_dim)


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
    if meta.is_decode:  # (a float32 decode step on CPU takes cpu_attention's one pass instead, in `attend`)
        return decode_gather.decode_attention(q, keys, values, meta, scale)
    if meta.prefill:
        return _prefill_apart(q, keys, values, meta.prefill, scale)
    num_tokens, num_heads, head_dim = q.shape
    b, max_q = meta.num_seqs, meta.max_query_len
    slots = meta.key_slots.flatten()
    kv_heads, head_dim = keys.shape[0], keys.shape[2]
    k = gather("k", keys, 1, slots).view(kv_heads, b, -1, head_dim).transpose(0, 1)  # [B, kv_heads, max_ctx, head_dim]
    v = gather("v", values, 1, slots).view(kv_heads, b, -1, head_dim).transpose(0, 1)
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

