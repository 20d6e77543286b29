"""The GPU check and benchmark in one command, for a machine with one NVIDIA GPU (`make gpu-bench`).

    PYTHONPATH=services python -m tandem.tools.gpu_bench --out DIR [--model DIR] [--quick]

In a few minutes, each step under a time limit of its own and within --budget-s in all, a step
that fails or runs out of time written down and the next one run anyway:

1. the Python packages the services import, and the generated protobuf modules (imports);
2. the `gpu`-marked tests, `pytest -m gpu -q` on the test modules that have any, to DIR/gpu-tests.txt;
3. a random-weight Llama checkpoint of about 0.85B parameters (tandem.tools.random_model), to
   DIR/model-*, unless --model names one (kept between invocations: a rerun reuses it);
4. the forward pass alone (tandem.tools.bench_forward: every layer in one process, a decode step of
   FORWARD_BATCH sequences at FORWARD_CONTEXT tokens, bf16), eager and through CUDA graphs, to
   DIR/forward.{json,txt};
5. `tandem bench --device cuda --dtype bfloat16 --compare baseline,full` with 2 and then 4 stage
   processes sharing the GPU, samplers on the host cores, to DIR/bench-{2,4}stages.{json,txt}
   and the services' logs to DIR/logs-{2,4}stages/;
6. DIR/summary.md: the GPU, torch, the test counts, the forward pass's step time in each mode, and
   per stage count the output tokens/s of baseline and full, their ratio, TTFT and TPOT p50, the
   stages' busy shares and "of peak".

Without a CUDA device it stops at once with exit status 2. --quick is a smaller model and
workload, to check that everything runs before spending minutes on the real figures.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

SERVICES_DIR = Path(__file__).resolve().parents[2]  # what PYTHONPATH must hold: the folder of `tandem`
REPO_DIR = SERVICES_DIR.parent
STAGE_COUNTS = (2, 4)
RUNS = ("baseline", "full")
FORWARD_BATCH, FORWARD_CONTEXT = 128, 256
MIN_STEP_S = 20.0  # a step with less time than this left in --budget-s is skipped
# Module -> the pip package that provides it, for what the services, tests and bench import.
MODULES = {"grpc": "grpcio", "grpc_health.v1.health": "grpcio-health-checking",
           "grpc_reflection.v1alpha.reflection": "grpcio-reflection", "google.protobuf": "protobuf",
           "yaml": "pyyaml", "numpy": "numpy", "safetensors": "safetensors", "tokenizers": "tokenizers",
           "transformers": "transformers", "tqdm": "tqdm", "pytest": "pytest"}
PROTO_MODULES = ("common", "tensor", "coordinator", "stage_worker", "cpu_sampler", "kv_store")


@dataclass(frozen=True)
class Size:
    """Model and workload of one mode (full or --quick)."""

    model_args: tuple[str, ...]  # tandem.tools.random_model options
    bench_args: tuple[str, ...]  # tandem bench workload options


FULL = Size(("--hidden", "2048", "--layers", "16", "--heads", "16", "--kv-heads", "4", "--vocab", "32000"),
            ("--num-requests", "128", "--prompt-len", "128", "--output-len", "128", "--num-blocks", "4096"))
QUICK = Size(("--hidden", "1024", "--layers", "8", "--heads", "16", "--kv-heads", "4", "--vocab", "32000"),
             ("--num-requests", "32", "--prompt-len", "64", "--output-len", "32", "--num-blocks", "1024"))


@dataclass(frozen=True)
class Step:
    """What became of one step."""

    name: str
    status: str  # "ok", "failed", "timed out" or "skipped"
    seconds: float = 0.0
    detail: str = ""  # why it failed or was skipped, or where its output is


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder of every output (made if missing)")
    p.add_argument("--model", type=Path, help="Hugging Face model directory to benchmark instead of a random one")
    p.add_argument("--quick", action="store_true", help="a ~0.16B-parameter model and a small workload")
    p.add_argument("--budget-s", type=float, default=480.0, help="seconds for every step together (default: 480)")
    p.add_argument("--tests-s", type=float, default=150.0, help="time limit of the GPU tests (default: 150)")
    p.add_argument("--model-s", type=float, default=120.0, help="time limit of writing the model (default: 120)")
    p.add_argument("--stage-counts", type=int, nargs="+", default=list(STAGE_COUNTS),
                   help="stage processes of each bench (default: 2 4)")
    p.add_argument("--tests", nargs="*", help="test files to run (default: every module with gpu-marked tests)")
    p.add_argument("--forward-s", type=float, default=90.0, help="time limit of the forward pass (default: 90)")
    p.add_argument("--bench-s", type=float, default=240.0, help="time limit of each bench (default: 240)")
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    args.size = QUICK if args.quick else FULL
    return args


def model_dir(args: argparse.Namespace) -> Path:
    """--model, or the random checkpoint's folder, named by its dimensions so that a rerun reuses it."""
    if args.model:
        return args.model.resolve()
    dims = dict(zip(args.size.model_args[::2], args.size.model_args[1::2]))
    return args.out / f"model-h{dims['--hidden']}-l{dims['--layers']}"


def bench_command(model: Path, num_stages: int, out: Path, size: Size) -> list[str]:
    """The `tandem bench` invocation for `num_stages` stages on the GPU, writing out/bench-Nstages.json."""
    return [sys.executable, "-m", "tandem.cli", "bench", "--model", str(model), "--device", "cuda",
            "--dtype", "bfloat16", "--compare", ",".join(RUNS), "--stages", str(num_stages), "--samplers", "4",
            *size.bench_args, "--json", str(out / f"bench-{num_stages}stages.json"),
            "--log-dir", str(out / f"logs-{num_stages}stages")]


def forward_command(model: Path, out: Path) -> list[str]:
    """tandem.tools.bench_forward on the GPU, eager and through CUDA graphs, writing out/forward.json."""
    return [sys.executable, "-m", "tandem.tools.bench_forward", "--model", str(model), "--device", "cuda",
            "--graphs", "--dtype", "bfloat16", "--batch", str(FORWARD_BATCH), "--context", str(FORWARD_CONTEXT),
            "--steps", "50", "--json", str(out / "forward.json")]


def gpu_test_files(tests_dir: Path) -> list[str]:
    """The test modules that hold `gpu`-marked tests, relative to the repository: only these are
    collected, so that a module this machine cannot import (the Helm tests' SDK) is not an error here."""
    return sorted(str(f.relative_to(tests_dir.parent)) for f in tests_dir.glob("test_*.py")
                  if "mark.gpu" in f.read_text(errors="replace"))


def parse_pytest_counts(text: str) -> dict[str, int]:
    """Counts of pytest's last summary line ("3 passed, 1 skipped, 90 deselected, 1 error in 9.1s")."""
    lines = [line for line in text.splitlines() if re.search(r"\b(passed|failed|error|errors|no tests ran|"
                                                             r"deselected|skipped)\b.* in [\d.]+s", line)]
    if not lines:
        return {}
    counts = {}
    for number, word in re.findall(r"(\d+) (passed|failed|skipped|deselected|xfailed|xpassed|errors?|warnings?)",
                                   lines[-1]):
        counts[word.rstrip("s") if word in ("errors", "warnings") else word] = int(number)
    return counts


# --- the summary: a pure function of what the steps left -----------------------------------------

def _num(x: float | None, fmt: str = ".1f", scale: float = 1.0, unit: str = "") -> str:
    return "-" if x is None else f"{x * scale:{fmt}}{unit}"


def _run_row(num_stages: int, run: Mapping) -> str:
    busy = " / ".join(_num(s.get("busy_fraction"), ".0f", 100, "%") for s in run.get("stages", [])) or "-"
    failed = f" ({run['num_failed']} failed)" if run.get("num_failed") else ""
    return (f"| {num_stages} | {run['name']}{failed} | {_num(run.get('output_tokens_per_s'))} | "
            f"{_num(run.get('ttft_p50_s'), '.1f', 1e3, ' ms')} | {_num(run.get('tpot_p50_s'), '.2f', 1e3, ' ms')} | "
            f"{busy} | {_num(run.get('fraction_of_peak'), '.2f', 100, '%')} |")


def _bench_lines(benches: Mapping[int, Mapping | None]) -> list[str]:
    done = {n: doc for n, doc in sorted(benches.items()) if doc}
    if not done:
        return ["No bench wrote its figures; see the steps above."]
    lines = ["| stages | baseline tok/s | full tok/s | full/baseline |", "| --- | --- | --- | --- |"]
    for n, doc in done.items():
        by_name = {r["name"]: r for r in doc.get("runs", [])}
        ratio = doc.get("ratios", {}).get("full/baseline", {}).get("output_tokens_per_s")
        lines.append(f"| {n} | {_num(by_name.get('baseline', {}).get('output_tokens_per_s'))} | "
                     f"{_num(by_name.get('full', {}).get('output_tokens_per_s'))} | {_num(ratio, '.2f', unit='x')} |")
    lines += ["", "| stages | run | output tok/s | TTFT p50 | TPOT p50 | stage busy (0 / 1 / ...) | of peak |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [_run_row(n, run) for n, doc in done.items() for run in doc.get("runs", [])]
    first = next(iter(done.values()))
    w, m = first.get("workload", {}), first.get("machine", {})
    lines += ["", f"Workload: {w.get('num_requests', '-')} requests, {w.get('prompt_tokens', '-')} prompt and "
                  f"{w.get('output_tokens', '-')} output tokens, all sent at once, temperature "
                  f"{w.get('temperature', '-')}. Peak: "
                  f"{_num(m.get('peak_flops_per_s'), '.1f', 1e-12, ' TFLOP/s')} ({m.get('peak_dtype', '-')} matmul, "
                  f"{m.get('peak_matrix_size', '-')}x{m.get('peak_matrix_size', '-')}); host {m.get('num_cores', '-')} "
                  f"cores, {m.get('cpu_model') or '-'}."]
    return lines


def _forward_lines(forward: Mapping | None) -> list[str]:
    runs = (forward or {}).get("runs", [])
    if not runs:
        return ["No figures (see the steps above)."]
    lines = ["| dtype | mode | batch | context | step | tok/s | of peak |", "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['dtype']} | {r['mode']} | {r['batch']} | {r['context']} | {_num(r['step_ms'], '.2f', unit=' ms')} | "
              f"{_num(r['tokens_per_s'], '.0f')} | {_num(r['fraction_of_peak'], '.1f', 100, '%')} |" for r in runs]
    ms = {r["mode"]: r["step_ms"] for r in runs}
    if "eager" in ms and "graphs" in ms:
        lines += ["", f"CUDA graphs: {ms['eager'] / ms['graphs']:.2f}x the eager step."]
    return lines


def format_summary(facts: Mapping[str, str], steps: Sequence[Step], tests: Mapping[str, int] | None,
                   benches: Mapping[int, Mapping | None], forward: Mapping | None = None) -> str:
    """summary.md from the machine's facts, the steps, pytest's counts, the forward pass's JSON and
    each bench's JSON (None: none)."""
    lines = ["# Tandem GPU benchmark", ""]
    lines += [f"- {key}: {value}" for key, value in facts.items()]
    lines += ["", "## Steps", "", "| step | status | seconds | detail |", "| --- | --- | --- | --- |"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.0f} | {s.detail.replace('|', '/')} |" for s in steps]
    lines += ["", "## GPU tests", ""]
    if tests:
        lines.append(", ".join(f"{tests.get(k, 0)} {k}" for k in ("passed", "failed", "skipped")) +
                     f", {tests.get('error', 0)} errors" +
                     f" ({tests.get('deselected', 0)} deselected; details in gpu-tests.txt)")
    else:
        lines.append("No counts (see gpu-tests.txt, if it was written).")
    lines += ["", "## Forward pass alone", "", *_forward_lines(forward)]
    lines += ["", "## Throughput and latency", "", *_bench_lines(benches)]
    return "\n".join(lines) + "\n"


# --- the steps --------------------------------------------------------------------------------------

def _tail(path: Path, num_chars: int = 200) -> str:
    """The end of a log, its lines joined, progress bars' carriage returns taken as line ends."""
    try:
        text = path.read_text(errors="replace").replace("\r", "\n")
    except OSError:
        return ""
    return " / ".join(line.strip() for line in text.splitlines() if line.strip())[-num_chars:]


def run_command(name: str, cmd: Sequence[str], log: Path, limit_s: float, env: Mapping[str, str]) -> Step:
    """Run `cmd` from the repository root, all output to `log`; its whole process group is stopped
    at the time limit (the bench's services with it)."""
    if limit_s < MIN_STEP_S:
        return Step(name, "skipped", 0, "no time left in --budget-s")
    start = time.monotonic()
    with open(log, "w") as out:
        out.write(f"$ {shlex.join(cmd)}\n\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=REPO_DIR, env=dict(env), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            return Step(name, "timed out", time.monotonic() - start, f"after {limit_s:.0f} s; see {log.name}")
    seconds = time.monotonic() - start
    if rc != 0:
        return Step(name, "failed", seconds, f"exit status {rc}; see {log.name}: ...{_tail(log)}")
    return Step(name, "ok", seconds, f"output in {log.name}")


def _stop_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def check_imports() -> Step:
    """The packages the services import and the generated protobuf modules, imported here."""
    start, missing = time.monotonic(), []
    for module, package in MODULES.items():
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - any failure to import is the finding
            missing.append(f"{module} ({package}: {type(e).__name__}: {e})"[:200])
    for name in PROTO_MODULES:
        for suffix in ("_pb2", "_pb2_grpc"):
            try:
                importlib.import_module(f"tandem.v1.{name}{suffix}")
            except Exception as e:  # noqa: BLE001 - missing, or generated for another protobuf/grpcio
                missing.append(f"tandem.v1.{name}{suffix} ({type(e).__name__}: {e})"[:200])
    status = "failed" if missing else "ok"
    return Step("imports", status, time.monotonic() - start, "; ".join(missing) or "every module imports")


def machine_facts() -> dict[str, str]:
    import torch

    props = torch.cuda.get_device_properties(0)
    return {"GPU": f"{props.name}, {props.total_memory / 2**30:.0f} GiB ({torch.cuda.device_count()} visible)",
            "torch": f"{torch.__version__} (CUDA {torch.version.cuda})",
            "Python": f"{platform.python_version()} ({sys.executable})", "host cores": str(os.cpu_count())}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(f"gpu_bench: torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False); "
              "this needs a machine with an NVIDIA GPU and a CUDA build of torch", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SERVICES_DIR), os.environ.get("PYTHONPATH")])),
           "TOKENIZERS_PARALLELISM": "false"}

    def limit(step_s: float) -> float:
        return min(step_s, deadline - time.monotonic())

    facts = machine_facts()
    steps = [check_imports()]
    tests_txt = args.out / "gpu-tests.txt"
    tests_txt.unlink(missing_ok=True)
    pytest = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
              *(args.tests or gpu_test_files(REPO_DIR / "tests"))]
    steps.append(run_command("gpu tests", pytest, tests_txt, limit(args.tests_s), env))
    tests = parse_pytest_counts(tests_txt.read_text(errors="replace")) if tests_txt.exists() else None

    model = model_dir(args)
    facts["model"] = f"{model} ({'given' if args.model else shlex.join(args.size.model_args)})"
    facts["workload"] = shlex.join(args.size.bench_args) + (" (--quick)" if args.quick else "")
    if args.model or (model / "tokenizer.json").exists():  # random_model writes the tokenizer last
        steps.append(Step("model", "ok", 0, "given" if args.model else "reused from an earlier invocation"))
    else:
        steps.append(run_command("model", [sys.executable, "-m", "tandem.tools.random_model", str(model),
                                           *args.size.model_args], args.out / "model.txt", limit(args.model_s), env))
    has_model = steps[-1].status == "ok" and (model / "config.json").exists()

    forward_json = args.out / "forward.json"
    forward_json.unlink(missing_ok=True)
    if has_model:
        steps.append(run_command("forward", forward_command(model, args.out), args.out / "forward.txt",
                                 limit(args.forward_s), env))
    else:
        steps.append(Step("forward", "skipped", 0, f"no model at {model}"))

    benches: dict[int, dict | None] = {}
    for n in args.stage_counts:
        name, json_path = f"bench, {n} stages", args.out / f"bench-{n}stages.json"
        json_path.unlink(missing_ok=True)  # no figures of an earlier invocation in this summary
        if has_model:
            steps.append(run_command(name, bench_command(model, n, args.out, args.size),
                                     args.out / f"bench-{n}stages.txt", limit(args.bench_s), env))
        else:
            steps.append(Step(name, "skipped", 0, f"no model at {model}"))
        benches[n] = _read_json(json_path)

    summary = format_summary(facts, steps, tests, benches, _read_json(forward_json))
    (args.out / "summary.md").write_text(summary)
    print(summary)
    return 0 if all(s.status == "ok" for s in steps) else 1


def _read_json(path: Path) -> dict | None:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


if __name__ == "__main__":
    raise SystemExit(main())
