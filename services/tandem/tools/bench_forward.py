"""Benchmark: one stage's forward pass alone, with no serving around it.

    PYTHONPATH=services python -m tandem.tools.bench_forward --model DIR [--batch 32] [--context 100]
        [--threads 1 2] [--dtype float32 bfloat16] [--device cpu|cuda] [--graphs]
        [--peer-python .venv-peer/bin/python] [--json PATH]

Loads every layer of the model (embeddings, decoder layers, final norm and LM head) as one
StageModel and times decode steps of `--batch` sequences that each hold `--context` tokens in
the KV cache: the step a serving stage runs most. For each dtype and thread count it prints the
milliseconds a step, output tokens a second, the model's FLOPs a second (2 x the projection and
LM-head parameters a token, plus attention's 4 x context x heads x head_dim a token and layer)
and that as a fraction of the machine's peak (the fastest dense matmul it runs in that dtype
and thread count, measured first). With `--graphs` each configuration is also timed through
core.cuda_graphs (captured on CUDA; on CPU the padded path runs eagerly), as mode "graphs".

With `--peer-python`, the Python of a virtualenv holding vLLM (`make peer-vllm`), vLLM runs the
same model, batch, context, dtype and cores offline, and its model runner's forward and
sampling calls of each decode step are timed (tools/peer_vllm_step.py). This is a benchmark, not a test: nothing is held to a time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from tandem.bench.flops import matmul_parameters, measure_peak
from tandem.core.cpus import keep_freed_memory
from tandem.core.modeling.cuda_graphs import DecodeGraphs
from tandem.core.modeling.model import DTYPES, StageModel
from tandem.core.modeling.model_config import ModelConfig
from tandem.core.modeling.profiler import BLOCK_SIZE, step_metadata
from tandem.core.modeling.stages import LayerRange

PEER_SCRIPT = Path(__file__).with_name("peer_vllm_step.py")


def model_flops_per_token(config: ModelConfig, context: int) -> float:
    """FLOPs of one decode token: projections and LM head, plus attention over `context` keys."""
    layers, head = matmul_parameters(config)
    return 2.0 * (layers + head) + 4.0 * context * config.num_attention_heads * config.head_dim * config.num_hidden_layers


def time_steps(model_dir: str, dtype: str, batch: int, context: int, steps: int, device: str = "cpu",
               graphs: bool = False) -> list[float]:
    """Seconds of each of `steps` decode steps (forward and logits) after a warm-up; with `graphs`,
    through core.cuda_graphs."""
    config, dev = ModelConfig.from_dir(model_dir), torch.device(device)
    model = StageModel.load(model_dir, LayerRange(0, config.num_hidden_layers, config.num_hidden_layers), dev,
                            dtype, config)
    blocks_per_seq = -(-(context + 1) // BLOCK_SIZE)
    cache = model.new_kv_cache(batch * blocks_per_seq + (1 if graphs else 0), BLOCK_SIZE)  # + the graphs' spare
    meta = step_metadata(batch, batch, context + 1, blocks_per_seq, dev, config.sliding_window)
    ids = torch.randint(0, config.vocab_size, (batch,), generator=torch.Generator().manual_seed(0)).to(dev)
    runner = DecodeGraphs(model, cache, batch, context + 1, capture=dev.type == "cuda") if graphs else None
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times = []
    for i in range(steps + 3):
        sync()
        start = time.perf_counter()
        out = runner.run(ids, meta) if runner is not None else model(ids, meta, cache)
        model.compute_logits(out, meta)
        sync()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return times


def peer_step_time(peer_python: str, model_dir: str, dtype: str, batch: int, context: int, threads: int,
                   vocab: int) -> float:
    """vLLM's seconds of a decode step's forward pass and logits (its `execute_model`, which also
    prepares the step's inputs) on the same batch, from the peer virtualenv."""
    cores = sorted(os.sched_getaffinity(0))[:threads]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_HOST_IP": "127.0.0.1",
           "VLLM_CPU_OMP_THREADS_BIND": f"{cores[0]}-{cores[-1]}", "VLLM_CPU_KVCACHE_SPACE": "2",
           "OMP_NUM_THREADS": str(threads)}
    spec = {"model": model_dir, "dtype": dtype, "batch": batch, "context": context, "steps": 40, "vocab": vocab}
    # The whole process on those cores: vLLM's thread binding alone left it using both cores
    # when asked for one.
    done = subprocess.run([peer_python, str(PEER_SCRIPT), json.dumps(spec)], env=env, capture_output=True,
                          text=True, timeout=900, preexec_fn=lambda: os.sched_setaffinity(0, cores))
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"vLLM run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])["forward_s"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--batch", type=int, default=32, help="sequences in the decode step (default: 32)")
    p.add_argument("--context", type=int, default=100, help="tokens each sequence holds in the KV cache (default: 100)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts (default: 1 2)")
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    p.add_argument("--steps", type=int, default=30, help="timed steps per configuration (default: 30)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu); on cuda --threads is ignored")
    p.add_argument("--graphs", action="store_true", help="also time each configuration through CUDA graphs")
    p.add_argument("--peer-python", help="Python of a virtualenv with vLLM, to time vLLM on the same batch")
    p.add_argument("--json", metavar="PATH", help="write the figures to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    keep_freed_memory()  # as `tandem serve` does for every stage
    config = ModelConfig.from_dir(args.model)
    flops = model_flops_per_token(config, args.context + 1)
    on_cuda = torch.device(args.device).type == "cuda"
    configs = [(dtype, threads, graphs) for dtype in args.dtype for threads in ([1] if on_cuda else args.threads)
               for graphs in ([False, True] if args.graphs else [False])]
    rows = []
    for dtype, threads, graphs in configs:
        torch.set_num_threads(threads)
        peak = measure_peak(dtype, args.device, num_threads=threads).flops_per_s
        step_s = statistics.median(time_steps(args.model, dtype, args.batch, args.context, args.steps,
                                              args.device, graphs))
        row = {"dtype": dtype, "threads": threads, "device": args.device, "mode": "graphs" if graphs else "eager",
               "batch": args.batch, "context": args.context,
               "step_ms": step_s * 1e3, "tokens_per_s": args.batch / step_s,
               "model_flops_per_s": flops * args.batch / step_s, "peak_flops_per_s": peak,
               "fraction_of_peak": flops * args.batch / step_s / peak}
        if args.peer_python and not on_cuda:
            peer_s = peer_step_time(args.peer_python, args.model, dtype, args.batch, args.context, threads,
                                    config.vocab_size)
            row.update(vllm_step_ms=peer_s * 1e3, vllm_tokens_per_s=args.batch / peer_s,
                       tandem_over_vllm=peer_s / step_s)
        rows.append(row)
        peer = (f"  vLLM {row['vllm_step_ms']:7.1f} ms ({row['tandem_over_vllm']:.2f}x)"
                if "vllm_step_ms" in row else "")
        print(f"{dtype:9} {row['mode']:6} {threads} thread(s): {row['step_ms']:7.2f} ms/step "
              f"{row['tokens_per_s']:8.1f} tok/s "
              f"{row['model_flops_per_s'] / 1e9:6.1f} GFLOP/s = {row['fraction_of_peak']:.0%} of "
              f"{peak / 1e9:.0f}{peer}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "flops_per_token": flops, "runs": rows}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
