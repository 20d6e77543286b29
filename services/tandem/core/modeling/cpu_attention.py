"""Decode attention on CPU that reads the paged KV cache where it lies.

The portable path (attention._decode) gathers every sequence's blocks into a padded copy and
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


def _kernel(q, keys, values, tables, lens, window, scale, out):  # pragma: no cover - compiled by numba
    """q [B, H, D]; keys, values [KVH, blocks, BS, D]; tables [B, max_blocks]; lens [B] context
    lengths; window: attend to the last `window` keys only (0: all) -> out [B, H, D]."""
    num_seqs, num_heads, head_dim = q.shape
    kv_heads, _, block_size, _ = keys.shape
    group = num_heads // kv_heads
    for job in numba.prange(num_seqs * kv_heads):
        b = job // kv_heads
        kh = job - b * kv_heads
        n = lens[b]
        start = n - window if 0 < window < n else 0
        first, last = start // block_size, (n + block_size - 1) // block_size
        width = (last - first) * block_size
        scores = np.empty((group, width), dtype=np.float32)
        qs = q[b, kh * group:(kh + 1) * group] * scale  # [group, D]
        for j in range(first, last):
            _block_scores(keys[kh, tables[b, j]], qs, scores, (j - first) * block_size)
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
            _block_values(values[kh, tables[b, j]], scores, (j - first) * block_size, acc_out)
        out[b, kh * group:(kh + 1) * group] = acc_out


def _compile(function, parallel: bool = False):
    """`function` compiled on first call; kept in numba's on-disk cache (next to this file, or in
    $NUMBA_CACHE_DIR) where one is writable, else compiled afresh in each process (a few seconds)."""
    options = dict(parallel=parallel, fastmath=True, nogil=True, error_model="numpy", boundscheck=False)
    try:
        return numba.njit(function, cache=True, **options)  # type: ignore[call-overload]
    except RuntimeError:  # no writable cache directory
        return numba.njit(function, **options)  # type: ignore[call-overload]


_block_scores = _compile(_block_scores)
_block_values = _compile(_block_values)
_serial = _compile(_kernel)
_parallel = _compile(_kernel, parallel=True)
_pool_lock = threading.Lock()
_MAX_THREADS = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]  # the size of numba's pool


def supports(q: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether the kernel serves this step: float32 tensors in host memory."""
    return q.device.type == "cpu" and keys.dtype == torch.float32 and q.dtype == torch.float32


def decode_attention(
    q: torch.Tensor,  # [B, heads, head_dim]
    keys: torch.Tensor,  # [kv_heads, slots, head_dim], one layer's cache, the new keys written
    values: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int64
    context_lens: torch.Tensor,  # [B] int64
    block_size: int,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """One query token per sequence over its context, read in place -> [B, heads, head_dim]."""
    kv_heads, _, head_dim = keys.shape
    q = q.contiguous()
    out = torch.empty_like(q)
    args = (q.numpy(), keys.view(kv_heads, -1, block_size, head_dim).numpy(),
            values.view(kv_heads, -1, block_size, head_dim).numpy(), block_tables.numpy(), context_lens.numpy(),
            sliding_window or 0, np.float32(scale), out.numpy())
    threads = torch.get_num_threads()
    if threads <= 1 or q.shape[0] * kv_heads < 2:
        _serial(*args)
    else:
        with _pool_lock:  # one parallel region at a time: stages sharing a process take turns
            numba.set_num_threads(min(threads, _MAX_THREADS))
            _parallel(*args)
    return out
