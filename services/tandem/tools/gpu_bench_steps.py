"""How gpu_bench runs a step and what becomes of it: a command from the repository root under a
time limit, its whole process group stopped at the limit; the imports checked in this process;
the facts of the machine.
"""

from __future__ import annotations

import importlib
import os
import platform
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
MIN_STEP_S = 20.0  # a step with less time than this left in --budget-s is skipped
# Module -> the pip package that provides it, for what the services, tests and bench import.
MODULES = {"grpc": "grpcio", "grpc_health.v1.health": "grpcio-health-checking",
           "grpc_reflection.v1alpha.reflection": "grpcio-reflection", "google.protobuf": "protobuf",
           "yaml": "pyyaml", "numpy": "numpy", "safetensors": "safetensors", "tokenizers": "tokenizers",
           "transformers": "transformers", "tqdm": "tqdm", "pytest": "pytest"}
PROTO_MODULES = ("common", "tensor", "coordinator", "stage_worker", "cpu_sampler", "kv_store")


@dataclass(frozen=True)
class Step:
    """What became of one step."""

    name: str
    status: str  # "ok", "failed", "timed out" or "skipped"
    seconds: float = 0.0
    detail: str = ""  # why it failed or was skipped, or where its output is


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
