"""The `tandem bench` command: its options, and the order in which runs happen (each one is
measured by measure.py).

Each run is measured first and printed after (report.py), so that the JSON, the text and the
plot all show the same numbers.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import os
import platform
import shlex
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from tandem.bench.measure import TRANSFORMERS, Target, log, measure
from tandem.bench.peer import PEER_VENV, VLLM, core_groups, find_peer_python, pipeline_size, thread_binding
from tandem.bench.profiling import find_py_spy
from tandem.bench.repeats import alternate, median_figures, run_label
from tandem.bench.workload import (
    Workload,
    build_workload,
    check_fits,
    parse_length,
    read_dataset,
    synthetic_entries,
)
from tandem.core.modeling.model_config import ModelConfig
from tandem.launcher import add_layout_arguments
from tandem.presets import resolve

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_NUM_REQUESTS = 32
# Sampling parameters sent on every request when given, by their client SDK names.
SAMPLING = ("top_p", "top_k", "repetition_penalty", "frequency_penalty", "presence_penalty")


def _length(text: str):
    try:
        return parse_length(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(kind: type) -> Callable[[str], float]:
    def convert(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return convert


def _within(kind: type, low: float, high: float, low_open: bool = False) -> Callable[[str], float]:
    def convert(text: str):
        value = kind(text)
        if not (low < value if low_open else low <= value) or not value <= high:
            raise argparse.ArgumentTypeError(f"must be in {'(' if low_open else '['}{low}, {high}], got {text}")
        return value
    return convert


def _addresses(text: str) -> list[str]:
    return [a.strip() for a in text.split(",") if a.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `tandem bench` (see tandem.bench for what it measures)."""
    where = p.add_argument_group("what to measure")
    where.add_argument("--model", help="Hugging Face model directory (default: the bundled tiny model)")
    where.add_argument("--preset", default="full",
                       help="technique preset of the deployment started: full, baseline, full-SWITCH (full with one "
                            "switch off) or baseline+SWITCH (baseline with one on), see tandem.presets "
                            "(default: full)")
    where.add_argument("--compare", type=lambda s: [n.strip() for n in s.split(",") if n.strip()],
                       help="comma-separated runs on the same workload, each in turn: preset names (as --preset) "
                            f"and/or '{TRANSFORMERS}' (Hugging Face generate), '{VLLM}' (the real vLLM's server on "
                            f"every core) and '{VLLM}-ppN' (vLLM, N pipeline stages, the cores split between them), "
                            f"e.g. baseline,full,{TRANSFORMERS},{VLLM},{VLLM}-pp2")
    where.add_argument("--repeats", type=_positive(int), default=1,
                       help="measurements of each run, alternating (A,B,A,B,... for --compare A,B), each on a "
                            "deployment of its own; the report gives medians and the spread (default: 1)")
    where.add_argument("--stages", type=_positive(int), default=2, help="pipeline stages (default: 2)")
    where.add_argument("--samplers", type=_positive(int), default=2, help="CPU sampler replicas (default: 2)")
    where.add_argument("--device", default="cpu", help="device of the stages and of the transformers run")
    where.add_argument("--dtype", choices=DTYPES, default="auto",
                       help="weights and activations of every run, and of the peak matmul (default: auto, the "
                            "checkpoint's dtype on CUDA and float32 on CPU)")
    add_layout_arguments(where)
    where.add_argument("--num-blocks", type=_positive(int), default=512, help="KV blocks per stage (default: 512)")
    where.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                       help="start Tandem's coordinators with prefix caching off (vLLM: --no-enable-prefix-caching "
                            "in --vllm-args)")
    where.add_argument("--log-dir", help="where the started services (and vLLM) write their logs, one folder per run "
                                         "(default: a temporary folder)")
    where.add_argument("--endpoint", help="HOST:PORT of a running deployment to measure instead of starting one")
    where.add_argument("--stage-addresses", type=_addresses, default=[],
                       help="with --endpoint: comma-separated stage addresses, stage 0 first, for stage figures")
    where.add_argument("--sampler-addresses", type=_addresses, default=[],
                       help="with --endpoint: comma-separated sampler addresses, for sampler figures")
    where.add_argument("--hf-batch-size", type=_positive(int), default=16,
                       help=f"requests per static batch of the '{TRANSFORMERS}' run (default: 16)")

    peer = p.add_argument_group("peers: other servers on the same requests (tandem.bench.peer)")
    peer.add_argument("--peer-python", help=f"Python of the virtualenv with vLLM for the '{VLLM}' runs (default: "
                                            f"{PEER_VENV}/bin/python at the repository root, made by `make peer-vllm`)")
    peer.add_argument("--vllm-args", type=shlex.split, default=[],
                      help="more arguments for the vLLM server, as one string, e.g. '--max-num-seqs 64'")
    peer.add_argument("--peer-endpoint", metavar="URL",
                      help="a running OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp) to measure through "
                           "/v1/completions after the other runs (alone without --compare), e.g. http://127.0.0.1:8000")
    peer.add_argument("--peer-name", default="peer", help="the --peer-endpoint run's name (default: peer)")

    load = p.add_argument_group("workload")
    load.add_argument("--num-requests", type=_positive(int),
                      help=f"requests measured (default: {DEFAULT_NUM_REQUESTS}, or every line of --dataset)")
    load.add_argument("--prompt-len", type=_length, default=parse_length("uniform:32,128"),
                      help="prompt length distribution: N, fixed:N, uniform:LO,HI or lognormal:MEAN,SIGMA[,MAX] "
                           "(default: uniform:32,128)")
    load.add_argument("--output-len", type=_length, default=parse_length("uniform:32,128"),
                      help="output length distribution, as --prompt-len (default: uniform:32,128)")
    load.add_argument("--dataset", help="JSONL trace, one {\"prompt_len\": N, \"output_len\": M[, \"prompt\": "
                                        "TEXT]} per line, instead of --prompt-len/--output-len")
    load.add_argument("--seed", type=int, default=0, help="seed of lengths, prompts, arrivals and sampling")
    load.add_argument("--shared-prefix-len", type=int, default=0,
                      help="tokens of one random system prompt every measured prompt starts with, before its own "
                           "prompt length (default: 0; a prefix cache's workload)")
    load.add_argument("--request-rate", type=_positive(float), default=math.inf,
                      help="Poisson arrivals per second (default: inf, every request at once)")
    load.add_argument("--max-concurrency", type=_positive(int),
                      help="most requests in flight (default: no limit; a coordinator refuses requests "
                           "beyond its queue, 256 waiting by default)")
    load.add_argument("--warmup", type=int, default=2, help="unmeasured warm-up requests per run (default: 2)")
    load.add_argument("--timeout", type=_positive(float), help="seconds a request may take (default: no limit)")

    sample = p.add_argument_group("sampling, on every request (unset: the server's default)")
    sample.add_argument("--temperature", type=_within(float, 0, math.inf), default=0.0,
                        help="sampling temperature (default: 0, greedy)")
    sample.add_argument("--top-p", type=_within(float, 0, 1, low_open=True), help="nucleus sampling mass, in (0, 1]")
    sample.add_argument("--top-k", type=_within(int, -1, math.inf), help="most likely tokens kept; -1 or 0: all")
    sample.add_argument("--repetition-penalty", type=_positive(float),
                        help="penalty on tokens already in the prompt or output, > 0 (1: none)")
    for name in ("frequency", "presence"):
        sample.add_argument(f"--{name}-penalty", type=_within(float, -2, 2),
                            help=f"{name} penalty, in [-2, 2]; '{TRANSFORMERS}' runs are refused with a non-zero "
                                 "value, as generate has no such penalty")

    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", help="write every figure to this JSON file")
    out.add_argument("--plot", metavar="PATH.png", help="draw throughput and latency side by side to this PNG")
    out.add_argument("--timeline", metavar="PATH.png",
                     help="draw each Tandem run's first repeat as a timeline of its stages' steps (prefill, decode or "
                          "both) to PATH-RUN.png")
    out.add_argument("--profile", metavar="DIR",
                     help="record every process of each run with py-spy over the measured window, to "
                          "DIR/RUN-PROCESS.txt (collapsed stacks), and report each one's hottest functions; "
                          "py-spy's own CPU time (a row of the CPU table) slows a profiled run, so take "
                          "throughput from runs without it")


def sampling_options(args: argparse.Namespace) -> dict[str, float | int]:
    """The sampling parameters every request carries: the temperature and those given."""
    given = {name: getattr(args, name) for name in SAMPLING if getattr(args, name) is not None}
    return {"temperature": args.temperature, **given}


def plan_targets(args: argparse.Namespace) -> list[Target]:
    """The runs the options ask for, in order; ValueError if they contradict each other."""
    peer = [Target(args.peer_name, "openai", f"the OpenAI-compatible server at {args.peer_endpoint}")] \
        if args.peer_endpoint else []
    if args.endpoint:
        for option, given in (("--compare", args.compare), ("--profile", args.profile)):
            if given:
                raise ValueError(f"{option} needs the deployments the bench starts; it cannot be combined "
                                 "with --endpoint")
        return [Target("endpoint", "endpoint", f"the deployment at {args.endpoint}"), *peer]
    if args.stage_addresses or args.sampler_addresses:
        raise ValueError("--stage-addresses and --sampler-addresses go with --endpoint")
    names = args.compare or ([] if peer else [args.preset])
    if len(set(names + [t.name for t in peer])) != len(names) + len(peer):
        raise ValueError(f"--compare lists a run twice, or --peer-name is a name in it: {','.join(names)}")
    targets = []
    samplers = f"{args.samplers} sampler{'s' if args.samplers > 1 else ''}"
    for name in names:
        if name == TRANSFORMERS:
            from tandem.bench.hf import generate_options

            generate_options(sampling_options(args))  # refuses what generate cannot do
            targets.append(Target(name, TRANSFORMERS, f"transformers generate, static batches of up to "
                                                      f"{args.hf_batch_size}, {args.device}"))
            continue
        if (size := pipeline_size(name)) is not None:
            cores = thread_binding(core_groups(size))
            targets.append(Target(name, VLLM, f"vLLM's OpenAI server, compiled, pipeline size {size}, "
                                              f"threads bound to cores {cores}"))
            continue
        try:
            resolve(name)
        except ValueError as e:
            raise ValueError(f"{e}; or {TRANSFORMERS} for Hugging Face generate, {VLLM} or {VLLM}-ppN for "
                             "vLLM") from None
        targets.append(Target(name, "tandem", f"tandem preset {name}: {args.stages} stages, {samplers}, "
                                              f"{args.device}"))
    return targets + peer


def check_extras(targets: Sequence[Target], args: argparse.Namespace) -> None:
    """ValueError if a package of the `bench` extra that the options need is not installed."""
    kinds = {t.kind for t in targets}
    needed = [pkg for pkg, wanted in (("transformers", TRANSFORMERS in kinds), ("matplotlib", bool(args.plot or args.timeline)),
                                      ("aiohttp", bool(kinds & {VLLM, "openai"}))) if wanted]
    missing = [pkg for pkg in needed if importlib.util.find_spec(pkg) is None]
    if args.profile and find_py_spy() is None:  # a dependency of tandem, but an executable, not a module
        raise ValueError("--profile needs the py-spy executable, found neither beside this Python nor on PATH")
    if missing:
        raise ValueError(f"{' and '.join(missing)} not installed; pip install 'tandem[bench]'")


def machine_info() -> dict:
    """Where the numbers were taken; the bound uses num_cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    except OSError:
        pass

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    return {"num_cores": cores, "cpu_count": os.cpu_count(), "cpu_model": model, "platform": platform.platform(),
            "python": platform.python_version(), "torch": version("torch"),
            "transformers": version("transformers"), "tandem": version("tandem")}


def make_workload(args: argparse.Namespace, vocab_size: int, tokenize: Callable[[str], list[int]]) -> Workload:
    if args.dataset:
        entries = read_dataset(args.dataset)[:args.num_requests]
        description: dict[str, Any] = {"dataset": str(args.dataset)}
    else:
        entries = synthetic_entries(args.num_requests or DEFAULT_NUM_REQUESTS, args.prompt_len, args.output_len,
                                    args.seed)
        description = {"prompt_len": args.prompt_len.spec(), "output_len": args.output_len.spec()}
    description.update(**sampling_options(args), max_concurrency=args.max_concurrency)
    return build_workload(entries, vocab_size, args.seed, num_warmup=max(0, args.warmup),
                          request_rate=args.request_rate, tokenize=tokenize, description=description,
                          shared_prefix_len=max(0, args.shared_prefix_len))


def model_facts(args: argparse.Namespace, model: str | None
                ) -> tuple[ModelConfig | None, int, int, Callable[[str], list[int]]]:
    """The model's configuration (None when only a deployment knows it), vocabulary size, longest
    prompt + output, and a tokenizer for trace prompts."""
    if model is None:  # --endpoint without --model: ask the deployment
        from tandem.client import TandemClient

        with TandemClient(args.endpoint, timeout_s=30) as client:
            info = client.server_info()

        def tokenize(text: str) -> list[int]:
            with TandemClient(args.endpoint, timeout_s=30) as c:
                return c.tokenize(text, add_special_tokens=False)
        return None, info.vocab_size, info.max_model_len, tokenize
    from tandem.core.tokenizer import Tokenizer

    config = ModelConfig.from_dir(model)
    tokenizer = functools.cache(lambda: Tokenizer.from_dir(model))  # only traces with prompt text need it
    return config, config.vocab_size, config.max_position_embeddings, \
        lambda text: tokenizer().encode(text, add_special_tokens=False)


def run_dtype(args: argparse.Namespace, config: ModelConfig | None) -> str | None:
    """--dtype resolved for the model on --device ("float32", "bfloat16", "float16"); None without a model."""
    if config is None:
        return None
    import torch

    from tandem.core.modeling.model import resolve_dtype

    return str(resolve_dtype(args.dtype, config, torch.device(args.device))).removeprefix("torch.")


def peak_flops(dtype: str | None, device: str, machine: dict) -> float | None:
    """The machine's dense-matmul peak in `dtype` (tandem.bench.flops), also recorded in `machine`."""
    if dtype is None:
        return None
    from tandem.bench.flops import measure_peak

    peak = measure_peak(dtype, device)
    machine.update({f"peak_{key}": value for key, value in peak.as_dict().items()})
    log(f"peak: {peak.flops_per_s / 1e9:.1f} GFLOP/s, {dtype} matmul ({peak.matrix_size}x{peak.matrix_size}) on "
         f"{peak.device}" + (f", {peak.num_threads} threads" if peak.num_threads else ""))
    return peak.flops_per_s


def run(args: argparse.Namespace, bundled_model: str) -> int:
    """Measure every run the options ask for, --repeats times in turn, print the report (each repeat,
    then the runs' medians), write --json and --plot."""
    import grpc

    from tandem.bench import report
    from tandem.client import ClientError
    peer_version = None
    try:  # everything that can be wrong with the options, found before anything starts
        targets = plan_targets(args)
        check_extras(targets, args)
        if any(t.kind == VLLM for t in targets):
            args.peer_python, peer_version = find_peer_python(args.peer_python)
        model = args.model or (None if args.endpoint else bundled_model)
        config, vocab_size, max_len, tokenize = model_facts(args, model)
        workload = make_workload(args, vocab_size, tokenize)
        check_fits(workload, max_len)
        dtype = run_dtype(args, config)
    except (ValueError, OSError, ClientError) as e:  # DatasetError is a ValueError; messages name the cause
        print(f"tandem bench: {e}", file=sys.stderr)
        return 2
    machine = machine_info() | ({"vllm": peer_version} if peer_version else {})
    w = workload.description
    log(f"workload: {w['num_requests']} requests, {w['prompt_tokens']} prompt and {w['output_tokens']} output "
         f"tokens, {w['num_warmup']} warm-up; {machine['num_cores']} cores")
    peak = peak_flops(dtype, args.device, machine)

    repeats: dict[str, list[dict]] = {t.name: [] for t in targets}
    for repeat, target in alternate(targets, args.repeats):
        label = run_label(target.name, repeat, args.repeats)
        log(f"{label}: {target.description}")
        try:
            m = measure(target, args, model, workload, dtype, label, sampling_options(args))
        except (RuntimeError, ClientError, grpc.RpcError) as e:  # a service failed to start or to answer
            print(f"tandem bench: {label}: {e}", file=sys.stderr)
            return 1
        figures = report.run_figures(target.name, m, machine["num_cores"], model=config, peak_flops_per_s=peak,
                                     kind=target.kind, description=target.description, repeat=repeat)
        repeats[target.name].append(figures)
        if args.timeline and m.timeline and repeat == 1:
            from tandem.bench.timeline import plot_timeline

            out = Path(args.timeline)
            out = out.with_name(f"{out.stem}-{target.name}{out.suffix or '.png'}")
            plot_timeline(m.timeline, out, f"{label}: {figures['output_tokens_per_s']:.0f} output tok/s")
            figures["timeline"] = [{"busy": s["busy"], "steps": s["kinds"]} for s in m.timeline["stages"]]
            log(f"timeline written to {out}")
        print(report.format_run(figures, args.repeats), flush=True)
        print()
    runs = [median_figures(figures) for figures in repeats.values()]
    ratios = report.compare(runs)
    print(report.format_comparison(runs, ratios))

    if args.json:
        document = {"runs": runs, "ratios": ratios, "workload": workload.description, "machine": machine,
                    "command": "tandem " + shlex.join(sys.argv[1:]),
                    "options": {k: (v.spec() if hasattr(v, "spec") else v) for k, v in vars(args).items()
                                if k != "func" and not (isinstance(v, float) and math.isinf(v))}}
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
        log(f"figures written to {args.json}")
    if args.plot:
        from tandem.bench.plot import plot_runs

        plot_runs(runs, args.plot)
        log(f"plot written to {args.plot}")
    failed = sum(r["num_failed"] for r in runs)
    if failed:
        print(f"tandem bench: {failed} requests failed", file=sys.stderr)
    return 1 if failed else 0
