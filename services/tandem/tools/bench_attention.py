"""Benchmark: one layer's float32 decode attention on CPU alone, the kernel against the portable path.

    PYTHONPATH=services python -m tandem.tools.bench_attention [--sequences 48] [--context 1000]
        [--heads 8] [--kv-heads 2] [--head-dim 64] [--block-size 16] [--threads 1] [--repeats 7]
        [--json PATH]

Builds one layer's paged KV cache with each sequence's blocks scattered through it, as a serving
stage's are, and times `attention.attend` on a decode step of `--sequences` rows of `--context`
tokens each: through core/modeling/cpu_attention.py's kernel (rotary, cache write and attention
in one pass) and through the portable path (decode_gather), alternating, `--repeats` rounds,
medians. It prints microseconds a (sequence, KV head) job and the keys and values read a second,
and checks first that both paths give the same output. With many sequences and long contexts the
cache is larger than the CPU's caches and comes from memory, as in a stage, where the layer's
weights have just gone through them; with few and short ones it stays in cache. A benchmark, not
a test: nothing is held to a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tandem.core.modeling import attention
from tandem.core.modeling.attention import AttentionMetadata, SequenceSlice
from tandem.core.modeling.model_config import RopeConfig
from tandem.core.modeling.rope import RotaryEmbedding


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tandem.tools.bench_attention", description=__doc__.split("\n")[0])
    p.add_argument("--sequences", type=int, default=48, help="rows of the decode step")
    p.add_argument("--context", type=int, default=1000, help="tokens of each sequence, the new one included")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the kernel's pool follows them)")
    p.add_argument("--repeats", type=int, default=7, help="alternating rounds of each path; medians are reported")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    for name in ("sequences", "context", "heads", "kv_heads", "head_dim", "block_size", "threads", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.heads % args.kv_heads:
        p.error("--heads must be a multiple of --kv-heads")
    return args


def decode_step(args: argparse.Namespace) -> Callable[[], torch.Tensor]:
    """One layer's decode step over a scattered cache, as a call of attention.attend."""
    generator = torch.Generator().manual_seed(0)
    blocks_each = -(-args.context // args.block_size)
    num_blocks = args.sequences * blocks_each
    order = torch.randperm(num_blocks, generator=generator).tolist()
    seqs = [SequenceSlice(args.context - 1, 1, order[i * blocks_each:(i + 1) * blocks_each])
            for i in range(args.sequences)]
    meta = AttentionMetadata.build(seqs, args.block_size)
    rotary = RotaryEmbedding(RopeConfig(theta=10000.0), args.head_dim, torch.device("cpu"))
    cos_sin = rotary.cos_sin(meta.positions, torch.float32)
    qkv = torch.randn(args.sequences, (args.heads + 2 * args.kv_heads) * args.head_dim, generator=generator)
    keys, values = torch.randn(2, args.kv_heads, num_blocks * args.block_size, args.head_dim, generator=generator)
    scale = args.head_dim ** -0.5
    return lambda: attention.attend(qkv, cos_sin, keys, values, meta, args.heads, scale)


def run(args: argparse.Namespace) -> dict:
    previous, previous_kernel = torch.get_num_threads(), attention.CPU_KERNEL
    torch.set_num_threads(args.threads)
    step = decode_step(args)
    paths = {"kernel": True, "portable": False}
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    calls = max(3, round(2e5 / (args.sequences * args.context)))  # about the same time a round at any size
    try:
        with torch.inference_mode():
            outputs = {}
            for name, kernel in paths.items():
                attention.CPU_KERNEL = kernel
                outputs[name] = step()  # also compiles the kernel, or loads it from numba's cache
            for _ in range(args.repeats):
                for name, kernel in paths.items():
                    attention.CPU_KERNEL = kernel
                    start = time.perf_counter()
                    for _ in range(calls):
                        step()
                    seconds[name].append((time.perf_counter() - start) / calls)
    finally:
        attention.CPU_KERNEL = previous_kernel
        torch.set_num_threads(previous)
    jobs = args.sequences * args.kv_heads
    kv_bytes = 2 * args.sequences * args.kv_heads * args.context * args.head_dim * 4
    result = {"sequences": args.sequences, "context": args.context, "heads": args.heads, "kv_heads": args.kv_heads,
              "head_dim": args.head_dim, "block_size": args.block_size, "threads": args.threads,
              "max_abs_difference": (outputs["kernel"] - outputs["portable"]).abs().max().item()}
    for name in paths:
        median = statistics.median(seconds[name])
        result[name] = {"ms_per_layer": median * 1e3, "us_per_job": median * 1e6 / jobs,
                        "kv_gb_per_s": kv_bytes / median / 1e9, "rounds_ms": [s * 1e3 for s in seconds[name]]}
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    print(f"{args.sequences} sequences x {args.context} tokens, {args.heads} heads over {args.kv_heads} KV heads of "
          f"{args.head_dim}, blocks of {args.block_size}, {args.threads} thread(s); outputs differ by at most "
          f"{result['max_abs_difference']:.1e}")
    for name in ("kernel", "portable"):
        r = result[name]
        print(f"  {name:9s} {r['ms_per_layer']:8.3f} ms a layer  {r['us_per_job']:8.1f} us a (sequence, KV head)  "
              f"keys and values read at {r['kv_gb_per_s']:5.1f} GB/s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
