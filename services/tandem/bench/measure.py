"""One run of `tandem bench`: what it measures (a Target), and measuring it, whatever it is: a
deployment the bench starts, a running one, Hugging Face generate, vLLM's server or another
OpenAI-compatible server.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from tandem.bench.peer import VLLM, pipeline_size
from tandem.bench.profiling import ProcessWatch, Profiler, find_py_spy
from tandem.bench.workload import Workload

TRANSFORMERS = "transformers"


@dataclass(frozen=True)
class Target:
    """What a run measures and how to describe it."""

    name: str
    kind: str  # "tandem" (a started deployment), "endpoint", "transformers", "vllm" or "openai" (--peer-endpoint)
    description: str


def log(message: str) -> None:
    """A progress line of the bench, on stderr."""
    print(f"# {message}", file=sys.stderr, flush=True)


def run_log_dir(args: argparse.Namespace, run: str) -> Path | None:
    """--log-dir/RUN, made; one folder per run, as services of the same name would overwrite each other's logs."""
    if not args.log_dir:
        return None
    path = Path(args.log_dir) / run
    path.mkdir(parents=True, exist_ok=True)
    return path


def typical_decode_step(workload: Workload, num_stages: int, max_in_flight: int = 0,
                        max_num_seqs: int = 64) -> tuple[int, int]:
    """(rows, context) of a decode micro-batch of this workload: the requests spread over the
    micro-batches in flight (0: one per stage), each sequence halfway through its output."""
    n = len(workload.requests)
    rows = max(1, min(max_num_seqs, -(-n // (max_in_flight or num_stages))))
    return rows, max(1, round((workload.prompt_tokens + workload.output_tokens / 2) / n))


def default_num_blocks(model: str, device: str, dtype: str, block_size: int = 16) -> int:
    """KV blocks per stage holding what vLLM's KV memory per worker holds (peer.KV_CACHE_GIB),
    a block counted over all the model's layers: no stage's cache outgrows that memory, and
    neither system preempts for want of blocks where the other would not."""
    import torch

    from tandem.bench.peer import KV_CACHE_GIB
    from tandem.core.modeling.model import resolve_dtype
    from tandem.core.modeling.model_config import ModelConfig

    config = ModelConfig.from_dir(model)
    itemsize = resolve_dtype(dtype, config, torch.device(device)).itemsize
    return max(1, KV_CACHE_GIB * 2**30 // config.kv_block_bytes(block_size, itemsize))


@contextmanager
def deployment(args: argparse.Namespace, model: str, preset: str, label: str, workload: Workload):
    """A deployment of `preset` started for one run, `label` (tandem.bench.repeats), and stopped, every
    process of it, after. With --stage-boundaries auto the layers are balanced for this workload's
    typical decode step."""
    from tandem.launcher import Launcher

    launcher = Launcher(log_dir=run_log_dir(args, label), say=lambda line: log(f"{label}: {line}"))
    try:
        num_blocks = args.num_blocks or default_num_blocks(model, args.device, args.dtype)
        endpoint = launcher.up(model, args.stages, args.samplers, port=0, num_blocks=num_blocks,
                               stage_threads=args.stage_threads, stage_boundaries=args.stage_boundaries,
                               max_in_flight=args.max_in_flight, max_num_seqs=args.max_num_seqs,
                               device=args.device, preset=preset, dtype=args.dtype,
                               balance_at=typical_decode_step(workload, args.stages, args.max_in_flight,
                                                              args.max_num_seqs),
                               step_logs=bool(args.timeline), prefix_caching=args.prefix_caching,
                               stream_interval=args.stream_interval)
        log(f"{label}: deployment ready on {endpoint} (logs in {launcher.log_dir})")
        yield endpoint, launcher
    finally:
        launcher.stop()


def process_watch(args: argparse.Namespace, run: str, pids: dict[str, int]) -> ProcessWatch:
    """CPU time (and with --profile, py-spy profiles) of a run's processes and of this one, "bench"."""
    pids = {**pids, "bench": os.getpid()}
    return ProcessWatch(pids, Profiler(find_py_spy(), args.profile, run, pids) if args.profile else None)


def measure(target: Target, args: argparse.Namespace, model: str | None, workload: Workload, dtype: str | None,
            label: str, sampling: dict[str, float | int]):
    """Run `target` on the workload with `sampling` on every request; `dtype` is the resolved one
    ("float32", ...), None without a model; `label` names the run's logs, profiles and progress
    bar (tandem.bench.repeats.run_label)."""
    from tandem.bench.metrics import ServiceProbe
    from tandem.bench.openai_api import measure_openai
    from tandem.bench.runner import SendOptions, measure_endpoint

    options = SendOptions(sampling, args.seed, args.max_concurrency, args.timeout, args.stream)
    if target.kind == VLLM:
        from tandem.bench.peer import VllmServer

        # vLLM's server streams in chunks of the same --stream-interval as Tandem's runs.
        interval = ["--stream-interval", str(args.stream_interval)] if args.stream_interval > 1 else []
        with VllmServer(args.peer_python, model, pipeline_size(target.name), dtype, run_log_dir(args, label),
                        [*interval, *args.vllm_args]) as server:
            log(f"{label}: vLLM ready on {server.url} (log in {server.log_path})")
            watch = process_watch(args, label, server.pids())
            return measure_openai(server.url, workload.requests, workload.warmup, options, label, watch)
    if target.kind == "openai":
        return measure_openai(args.peer_endpoint, workload.requests, workload.warmup, options, label)
    if target.kind == TRANSFORMERS:
        from tandem.bench.hf import measure_transformers

        if args.request_rate != math.inf or args.max_concurrency:
            log(f"{TRANSFORMERS}: runs offline; --request-rate and --max-concurrency do not apply to it")
        return measure_transformers(model, workload.requests, workload.warmup, sampling=options.sampling,
                                    seed=args.seed, device=args.device, batch_size=args.hf_batch_size,
                                    dtype=args.dtype, watch=process_watch(args, label, {}))
    if target.kind == "endpoint":  # service figures only for the services whose addresses were given
        addresses = (args.stage_addresses, args.sampler_addresses)
        with ServiceProbe(*addresses) if any(addresses) else nullcontext() as probe:
            return measure_endpoint(args.endpoint, workload.requests, workload.warmup, options, probe, label)
    with deployment(args, model, target.name, label, workload) as (endpoint, launcher), \
            ServiceProbe(launcher.stages, launcher.samplers) as probe:
        watch = process_watch(args, label, {name: proc.pid for name, proc in launcher.children})
        m = measure_endpoint(endpoint, workload.requests, workload.warmup, options, probe, label, watch)
        m.layout, m.layout_warnings = list(launcher.notes), list(launcher.warnings)
        from tandem.client import TandemClient

        with TandemClient(endpoint) as client:
            info = client.server_info()
        m.prefix_cache = (info.prefix_cache_queries_total, info.prefix_cache_hits_total)
        if launcher.step_logs:
            from tandem.bench.timeline import read_timeline

            m.timeline = read_timeline(launcher.step_logs, m.window_ns)
        return m
