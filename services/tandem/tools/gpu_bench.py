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
import os
import re
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tandem.tools.gpu_bench_steps import REPO_DIR, SERVICES_DIR, Step, check_imports, machine_facts, run_command
from tandem.tools.gpu_bench_summary import format_summary

STAGE_COUNTS = (2, 4)
RUNS = ("baseline", "full")
FORWARD_BATCH, FORWARD_CONTEXT = 128, 256


@dataclass(frozen=True)
class Size:
    """Model and workload of one mode (full or --quick)."""

    model_args: tuple[str, ...]  # tandem.tools.random_model options
    bench_args: tuple[str, ...]  # tandem bench workload options


FULL = Size(("--hidden", "2048", "--layers", "16", "--heads", "16", "--kv-heads", "4", "--vocab", "32000"),
            ("--num-requests", "128", "--prompt-len", "128", "--output-len", "128", "--num-blocks", "4096"))
QUICK = Size(("--hidden", "1024", "--layers", "8", "--heads", "16", "--kv-heads", "4", "--vocab", "32000"),
             ("--num-requests", "32", "--prompt-len", "64", "--output-len", "32", "--num-blocks", "1024"))


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
