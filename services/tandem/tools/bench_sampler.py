"""Benchmark: the straightforward sampler (`reference.sample`) against `FastSampler`.

    PYTHONPATH=services python -m tandem.tools.bench_sampler [--threads 1 2] [--steps N] [--json PATH]

A frame is 32 rows of a 32,000-token vocabulary sampled with temperature 0.8, top-p 0.9 and
repetition, frequency and presence penalties, each sequence with a prompt and an output
history of a few hundred tokens; the frame is sampled `--steps` times, so the histories grow
as in decoding. Both samplers get identical copies of the sequences and the same logits, and
the tokens (and histories) must come out identical, or the run fails.

Logits: "peaked" rows look like a language model's (Gaussian noise plus 40 plausible tokens
2 to 10 above it: top-p sets from one token to over a thousand, median about ten); "flat"
rows are plain Gaussian noise, a hard case whose top-p sets mostly hold over a thousand.

`--threads` sets torch's thread count (both samplers run under it); `--sampler-threads` is
FastSampler's own num_threads. Prints ms per frame for each sampler and the speedup, per
thread count and logits kind. This is a benchmark, not a test: nothing is held to a time.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import torch

from tandem.core.sampling.fast import FastSampler
from tandem.core.sampling.options import SamplingOptions
from tandem.core.sampling.reference import SequenceState, sample
from tandem.v1 import common_pb2

ROWS = 32
VOCAB = 32000


def make_states(seed: int, prompt_len: int, output_len: int) -> list[SequenceState]:
    rng = random.Random(seed)
    params = common_pb2.SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.1,
                                       frequency_penalty=0.3, presence_penalty=0.2, max_tokens=4096)
    options = SamplingOptions.from_proto(params, VOCAB, 4096)
    return [SequenceState(f"bench-{i}", options, rng.getrandbits(62),
                          [rng.randrange(VOCAB) for _ in range(prompt_len)],
                          [rng.randrange(VOCAB) for _ in range(output_len)])
            for i in range(ROWS)]


def make_logits(kind: str, step: int) -> torch.Tensor:
    """[ROWS, VOCAB] float32 logits of one decoding step."""
    generator = torch.Generator().manual_seed(1000 + step)
    if kind == "flat":
        return torch.randn(ROWS, VOCAB, generator=generator) * 2.5
    logits = torch.randn(ROWS, VOCAB, generator=generator) * 2.0
    plausible = torch.randint(0, VOCAB, (ROWS, 40), generator=generator)  # [rows, 40]
    boost = 2.0 + 8.0 * torch.rand(ROWS, 40, generator=generator)  # some stand far out, some not
    return logits.scatter_add_(1, plausible, boost)


def run(kind: str, threads: int, sampler_threads: int, steps: int, prompt_len: int, output_len: int) -> dict:
    torch.set_num_threads(threads)
    reference_states = make_states(7, prompt_len, output_len)
    fast_states = copy.deepcopy(reference_states)
    fast = FastSampler(sampler_threads)
    frames = [make_logits(kind, step) for step in range(steps + 1)]
    reference_s = fast_s = 0.0
    for step, logits in enumerate(frames):  # step 0 warms both up and is not timed
        indices = [s.num_outputs for s in reference_states]
        start = time.perf_counter()
        expected = sample(logits, reference_states, indices)
        middle = time.perf_counter()
        got = fast.sample(logits, fast_states, indices)
        end = time.perf_counter()
        if got != expected:
            raise SystemExit(f"{kind}, {threads} thread(s), step {step}: the samplers disagree")
        if step:
            reference_s += middle - start
            fast_s += end - middle
    fast.close()
    sizes = sorted(_top_p_set_size(row) for row in frames[-1])
    return {
        "logits": kind, "threads": threads, "sampler_threads": sampler_threads, "rows": ROWS,
        "vocab": VOCAB, "frames": steps, "prompt_len": prompt_len, "output_len": output_len,
        "straightforward_ms": 1e3 * reference_s / steps, "fast_ms": 1e3 * fast_s / steps,
        "speedup": reference_s / fast_s, "tokens_identical": True,
        "fast_top_p_rows_by_path": dict(fast.draw.top_p_rows),
        "top_p_set_size_min_median_max": [sizes[0], sizes[len(sizes) // 2], sizes[-1]],
    }


def _top_p_set_size(row: torch.Tensor) -> int:
    """The size of a raw logits row's top-p 0.9 set at temperature 0.8 (for the report)."""
    probs = torch.softmax(row / 0.8, -1).sort(descending=True).values
    return int(((probs.cumsum(-1) - probs) < 0.9).sum())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="torch thread counts to run")
    parser.add_argument("--sampler-threads", type=int, default=1, help="FastSampler's num_threads")
    parser.add_argument("--logits", nargs="+", default=["peaked", "flat"], choices=["peaked", "flat"])
    parser.add_argument("--steps", type=int, default=5, help="timed frames per run")
    parser.add_argument("--prompt-len", type=int, default=300)
    parser.add_argument("--output-len", type=int, default=200)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    results = []
    for threads in args.threads:
        for kind in args.logits:
            r = run(kind, threads, args.sampler_threads, args.steps, args.prompt_len, args.output_len)
            results.append(r)
            print(f"{kind:6s} logits, {threads} torch thread(s): straightforward {r['straightforward_ms']:7.2f} "
                  f"ms/frame, fast {r['fast_ms']:6.2f} ms/frame, speedup {r['speedup']:5.1f}x, tokens identical "
                  f"(top-p set sizes min/median/max {r['top_p_set_size_min_median_max']}; "
                  f"top-p rows by path {r['fast_top_p_rows_by_path']})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
