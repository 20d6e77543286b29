"""Decode attention on CPU that reads the paged KV cache where it lies.

The portable path (decode_gather) gathers every sequence's blocks into a padded copy and
runs two batched matmuls whose inner dimension is the group of query heads sharing a KV head
(four for the models here): a copy of the whole context per layer and a matmul shape the BLAS
libraries handle poorly. This kernel, compiled by numba, walks each sequence's block table
instead: one job per (sequence, KV head) reads each key and value row once, for all the query
heads of its group, with a softmax between the two passes. It reads the keys and values once
and writes nothing but the output; the gather path reads them twice and writes a copy. On this
project's 2-core machine (mid model, 32 sequences, one torch thread), `python -m
tandem.tools.bench_forward --context 500` ran a whole decode step in 54 to 57 ms against 71 to 73
through the gather path, and at context 100 in 38 against 39 to 41. At 32 sequences of 500 tokens
one layer reads 17 MB of cache, and the kernel runs near the memory bandwidth one core gets here
(about 8 GB/s).

Each job starts where the layer's fused q/k/v projection ends (`decode_step`): it rotates the
row's q and k heads and writes the new key and value into the cache before it attends, where
the portable path spends five tensor operations a layer (the rotary embedding's slices,
negation, concatenation, products and sum, and two index copies). The keys written are the same
bits: the rotation is compiled without fastmath, so it rounds as those operations do. Against
the kernel that began after them (mid model, 32 sequences, all 8 layers, one thread, alternating
in one process, medians of 5): 25.7 -> 24.7 ms a step at context 100, 39.1 -> 37.1 ms at context
500; two threads at context 100, 19.0 -> 18.4 ms.

float32 only; other dtypes and GPUs take the portable path. (A bfloat16 variant that widened
each block to float32 through a block-loading function passed in as an argument ran, but numba
cannot load such a kernel from its on-disk cache in another process.) With one
thread the kernel runs serially in the calling thread; with more it runs its jobs on numba's
OpenMP pool, which follows the process's CPU affinity.
"""

from __future__ import annotations

import math
import threading

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# Blocks of keys (or values) asked of memory ahead of the one being read. A sequence's blocks lie
# anywhere in the pool, so the hardware prefetcher, which follows a stream within a page, starts
# cold at each 4 KB block; asking for the next blocks while one is read measured 12-28% faster
# a job on a cache of 48 sequences of 300 to 1,000 tokens (one block ahead or four: about the same).
PREFETCH_BLOCKS = 2
_FLOATS_PER_LINE = 16  # of a 64-byte cache line


@intrinsic
def _prefetch(typingctx, array, index):  # pragma: no cover - compiled by numba
    """Ask the caches for the line holding element `index` of a C-contiguous array's data (a
    hint: it never faults, and changes nothing the kernel computes)."""
    if not isinstance(array, types.Array) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        item = context.get_abi_sizeof(context.get_data_type(signature.args[0].dtype))
        offset = builder.mul(context.cast(builder, args[1], signature.args[1], types.intp),
                             context.get_constant(types.intp, item))
        address = builder.gep(builder.bitcast(data, ir.IntType(8).as_pointer()), [offset])
        i32 = ir.IntType(32)
        hint = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), i32, i32, i32])
        # read (0), keep in every level (3), data (1)
        builder.call(cgutils.get_or_insert_function(builder.module, hint, "llvm.prefetch.p0i8"),
                     [address, i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(array, index), codegen


def _prefetch_block(cache, kh, block):  # pragma: no cover - compiled by numba
    """Every line of KV head kh's block `block` of a cache [KVH, blocks, BS, D], asked ahead."""
    num_blocks, block_size, head_dim = cache.shape[1], cache.shape[2], cache.shape[3]
    base = (kh * num_blocks + block) * block_size * head_dim
    for offset in range(0, block_size * head_dim, _FLOATS_PER_LINE):
        _prefetch(cache, base + offset)


def _block_scores(block, qs, scores, column):  # pragma: no cover - compiled by numba
    """scores[g, column + i] = qs[g] . block[i] for each row i of a block [BS, D]."""
    for i in range(block.shape[0]):
        for g in range(qs.shape[0]):
            acc = np.float32(0.0)
            for d in range(qs.shape[1]):
                acc += qs[g, d] * block[i, d]
            scores[g, column + i] = acc


def _block_values(block, scores, column, acc_out):  # pragma: no cover - compiled by numba
    """acc_out[g] += scores[g, column + i] * block[i] for each row i of a block [BS, D]."""
    for i in range(block.shape[0]):
        for g in range(acc_out.shape[0]):
            p = scores[g, column + i]
            for d in range(acc_out.shape[1]):
                acc_out[g, d] += p * block[i, d]


def _rope_into(x, cos, sin, out):  # pragma: no cover - compiled by numba
    """out = x * cos + rotate_half(x) * sin for one head [D], rounded as torch's three ops round
    it (compiled without fastmath: no fused multiply-add), so a key written here equals the one
    the portable path writes."""
    half = x.shape[0] // 2
    for d in range(half):
        out[d] = x[d] * cos[d] + (-x[d + half]) * sin[d]
        out[d + half] = x[d + half] * cos[d + half] + x[d] * sin[d + half]


def _attend(qs, keys, values, tables, lens, b, kh, window, out):  # pragma: no cover - compiled by numba
    """Sequence b's queries qs [group, D] (scaled) over its keys of KV head kh -> out [group, D]."""
    group, head_dim = qs.shape
    block_size = keys.shape[2]
    n = lens[b]
    start = n - window if 0 < window < n else 0
    first, last = start // block_size, (n + block_size - 1) // block_size
    width = (last - first) * block_size
    scores = np.empty((group, width), dtype=np.float32)
    for j in range(first, min(last, first + PREFETCH_BLOCKS)):
        _prefetch_block(keys, kh, tables[b, j])
    for j in range(first, last):
        if j + PREFETCH_BLOCKS < last:
            _prefetch_block(keys, kh, tables[b, j + PREFETCH_BLOCKS])
        _block_scores(keys[kh, tables[b, j]], qs, scores, (j - first) * block_size)
    for j in range(first, min(last, first + PREFETCH_BLOCKS)):  # the values' first blocks, asked now
        _prefetch_block(values, kh, tables[b, j])
    lo, hi = start - first * block_size, n - first * block_size  # the real keys among the columns
    for g in range(group):
        top = scores[g, lo]
        for t in range(lo + 1, hi):
            top = max(top, scores[g, t])
        total = np.float32(0.0)
        for t in range(lo, hi):
            # Below e^-80 (a weight 1e-35 of the largest) a key adds nothing a float32 can
            # hold, and its subnormal weight would slow the value pass many times over.
            x = scores[g, t] - top
            e = math.exp(x) if x > -80.0 else np.float32(0.0)
            scores[g, t] = e
            total += e
        inv = np.float32(1.0) / total
        for t in range(width):
            scores[g, t] = scores[g, t] * inv if lo <= t < hi else np.float32(0.0)
    acc_out = np.zeros((group, head_dim), dtype=np.float32)
    for j in range(first, last):
        if j + PREFETCH_BLOCKS < last:
            _prefetch_block(values, kh, tables[b, j + PREFETCH_BLOCKS])
        _block_values(values[kh, tables[b, j]], scores, (j - first) * block_size, acc_out)
    out[:] = acc_out


def _step_kernel(qkv, cos, sin, keys, values, slots, tables, lens, window, scale, out):  # pragma: no cover
    """A whole decode step's attention from the fused projection: qkv [B, (H + 2 KVH) * D] rows of
    q, k, v heads; cos, sin [B, D]; slots [B] each new key's cache slot. Rotates q and k, writes
    k and v into keys, values [KVH, blocks, BS, D], and attends -> out [B, H, D]."""
    num_seqs, num_heads, head_dim = out.shape
    kv_heads, _, block_size, _ = keys.shape
    group = num_heads // kv_heads
    for job in numba.prange(num_seqs * kv_heads):
        b = job // kv_heads
        kh = job - b * kv_heads
        block, offset = slots[b] // block_size, slots[b] % block_size
        k0, v0 = (num_heads + kh) * head_dim, (num_heads + kv_heads + kh) * head_dim
        _rope_into(qkv[b, k0:k0 + head_dim], cos[b], sin[b], keys[kh, block, offset])
        values[kh, block, offset] = qkv[b, v0:v0 + head_dim]
        qs = np.empty((group, head_dim), dtype=np.float32)
        for g in range(group):
            h0 = (kh * group + g) * head_dim
            _rope_into(qkv[b, h0:h0 + head_dim], cos[b], sin[b], qs[g])
        qs *= scale
        _attend(qs, keys, values, tables, lens, b, kh, window, out[b, kh * group:(kh + 1) * group])


def _compile(function, parallel: bool = False, fastmath: bool = True):
    """`function` compiled on first call; kept in numba's on-disk cache (next to this file, or in
    $NUMBA_CACHE_DIR) where one is writable, else compiled afresh in each process (a few seconds)."""
    options = dict(parallel=parallel, fastmath=fastmath, nogil=True, error_model="numpy", boundscheck=False)
    try:
        return numba.njit(function, cache=True, **options)  # type: ignore[call-overload]
    except RuntimeError:  # no writable cache directory
        return numba.njit(function, **options)  # type: ignore[call-overload]


_prefetch_block = _compile(_prefetch_block)
_block_scores = _compile(_block_scores)
_block_values = _compile(_block_values)
_rope_into = _compile(_rope_into, fastmath=False)
_attend = _compile(_attend)
_serial = _compile(_step_kernel)
_parallel = _compile(_step_kernel, parallel=True)
_pool_lock = threading.Lock()
_MAX_THREADS = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]  # the size of numba's pool


def supports(q: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether the kernel serves this step: float32 tensors in host memory."""
    return q.device.type == "cpu" and keys.dtype == torch.float32 and q.dtype == torch.float32


def decode_step(
    qkv: torch.Tensor,  # [B, (heads + 2 * kv_heads) * head_dim]: each row's q, k and v heads
    cos: torch.Tensor,  # [B, 1, head_dim] rotary embedding of each row's position
    sin: torch.Tensor,
    keys: torch.Tensor,  # [kv_heads, slots, head_dim], one layer's cache
    values: torch.Tensor,
    slot_mapping: torch.Tensor,  # [B] int64 the cache slot of each row's new key and value
    block_tables: torch.Tensor,  # [B, max_blocks] int64
    context_lens: torch.Tensor,  # [B] int64, the new key included
    block_size: int,
    num_heads: int,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """A whole decode step's attention in one pass from the fused q/k/v projection: q and k
    rotated, the new keys and values written to the cache, attention read in place ->
    [B, heads * head_dim]. The same keys, values and output as apply_rotary, write_kv and
    attention.paged_attention in turn (the portable path), without their tensor operations."""
    kv_heads, _, head_dim = keys.shape
    num_seqs = qkv.shape[0]
    out = qkv.new_empty(num_seqs, num_heads, head_dim)
    _run(num_seqs * kv_heads, (
        qkv.contiguous().numpy(), cos.reshape(num_seqs, head_dim).numpy(), sin.reshape(num_seqs, head_dim).numpy(),
        keys.view(kv_heads, -1, block_size, head_dim).numpy(), values.view(kv_heads, -1, block_size, head_dim).numpy(),
        slot_mapping.numpy(), block_tables.numpy(), context_lens.numpy(), sliding_window or 0, np.float32(scale),
        out.numpy()))
    return out.view(num_seqs, num_heads * head_dim)


def _run(num_jobs: int, args: tuple) -> None:
    """With one torch thread the kernel runs in the calling thread; with more, on numba's pool."""
    threads = torch.get_num_threads()
    if threads <= 1 or num_jobs < 2:
        _serial(*args)
    else:
        with _pool_lock:  # one parallel region at a time: stages sharing a process take turns
            numba.set_num_threads(min(threads, _MAX_THREADS))
            _parallel(*args)
