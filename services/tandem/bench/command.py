"""The `tandem bench` command: the runs its options ask for, what they need, and the order in
which they happen (each one is measured by measure.py; the options are options.py, and what the
figures rest on, facts.py).

Each run is measured first and printed after (report.py), so that the JSON, the text and the
plot all show the same numbers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tandem.bench.cputime import wait_until_quiet
from tandem.bench.facts import machine_info, model_facts, peak_flops, run_dtype
from tandem.bench.measure import TRANSFORMERS, Target, log, measure
from tandem.bench.options import DEFAULT_NUM_REQUESTS, sampling_options
from tandem.bench.peer import VLLM, core_groups, find_peer_python, pipeline_size, thread_binding
from tandem.bench.profiling import find_py_spy
from tandem.bench.repeats import alternate, median_figures, run_label
from tandem.bench.workload import Workload, build_workload, check_fits, read_dataset, synthetic_entries
from tandem.presets import resolve


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
         f"tokens, {w['num_warmup']} warm-up{'' if args.stream else ', each asking for its result alone (--no-stream)'}; "
         f"{machine['num_cores']} cores")
    peak = peak_flops(dtype, args.device, machine)

    repeats: dict[str, list[dict]] = {t.name: [] for t in targets}
    for repeat, target in alternate(targets, args.repeats):
        label = run_label(target.name, repeat, args.repeats)
        if args.settle > 0 and (busy := wait_until_quiet(max_wait_s=args.settle)) is not None and busy >= 0.15:
            log(f"{label}: the cores are still {busy:.0%} busy after {args.settle:g} s of waiting; measuring anyway")
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
            figures["timeline"] = [{"busy": s["busy"], "steps": s["kinds"], "preempted": s["preempted"]}
                                   for s in m.timeline["stages"]]
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
