"""--profile: py-spy stack samples of every process of a run over the measured window, summed up.

One `py-spy record` per process, started just before the window and stopped with SIGINT (on
which py-spy writes what it has) just after it, writes DIR/<run>-<process>.txt in py-spy's raw
format: one line per distinct stack, frames root first joined by ';', then the number of
samples. `--function` makes a frame "function (file:first line of the function)", so a
function's samples add up whatever line was running. py-spy leaves out idle threads (waiting
on a lock, a queue, a socket, sleeping) by default, so the samples are where the process
computed; a thread that wakes from short waits often is still caught in them at times, which
shows as frames such as Condition.wait. `--nonblocking` reads the process without pausing it, so the profile costs its
target little; py-spy's own CPU time is counted as "py-spy" in the CPU table.

Attaching needs ptrace permission over the target (root, CAP_SYS_PTRACE, or
kernel.yama.ptrace_scope 0 for a child); where py-spy cannot attach, the run has that
process's error, never a profile.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from tandem.bench.cputime import CpuClock, CpuWindow

SAMPLES_PER_S = 100
TOP = 8
ATTACH_S = 0.5  # py-spy attaches in the background after it starts, in well under this
STOP_TIMEOUT_S = 30.0


def find_py_spy() -> str | None:
    """The py-spy executable: beside this Python (a virtualenv not activated), or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def parse_collapsed(text: str) -> Counter[tuple[str, ...]]:
    """Samples per stack (frames root first) from py-spy's raw output."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in text.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if stack:
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def summarize(stacks: Mapping[tuple[str, ...], int], top: int = TOP) -> dict:
    """Samples, and the `top` frames by self samples (running in the frame itself) and by
    inclusive samples (the frame anywhere on the stack, counted once per sample), as fractions."""
    total = sum(stacks.values())
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, n in stacks.items():
        own[frames[-1]] += n
        for frame in set(frames):  # a recursive function counts once per sample
            inclusive[frame] += n

    def best(counts: Counter[str]) -> list[list]:
        return [[frame, n / total] for frame, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]
    return {"samples": total, "top_self": best(own), "top_inclusive": best(inclusive)}


def _error(log: Path) -> str:
    text = log.read_text() if log.exists() else ""
    line = next((line for line in text.splitlines() if line.startswith("Error")), "")
    return f"py-spy could not profile it: {line or 'no output'} (see {log})"


class Profiler:
    """A py-spy recorder on each named process, from `start` to `stop`."""

    def __init__(self, py_spy: str, out_dir: str | Path, run: str, pids: Mapping[str, int]):
        self.py_spy, self.out_dir, self.run, self.targets = py_spy, Path(out_dir), run, dict(pids)
        self._recorders: dict[str, subprocess.Popen] = {}

    def _path(self, name: str, suffix: str) -> Path:
        return self.out_dir / f"{self.run}-{name}{suffix}"

    def start(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, pid in self.targets.items():
            self._path(name, ".txt").unlink(missing_ok=True)  # a failed recorder must not leave an old one
            with open(self._path(name, ".log"), "w") as log:
                self._recorders[name] = subprocess.Popen(
                    [self.py_spy, "record", "--pid", str(pid), "--rate", str(SAMPLES_PER_S), "--format", "raw",
                     "--function", "--nonblocking", "--output", str(self._path(name, ".txt"))],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        time.sleep(ATTACH_S)

    def running_pids(self) -> list[int]:
        return [p.pid for p in self._recorders.values() if p.poll() is None]

    def stop(self) -> dict[str, dict]:
        """Stop every recorder; {process: summary and file, or {"error": why}}."""
        for recorder in self._recorders.values():
            if recorder.poll() is None:
                recorder.send_signal(signal.SIGINT)
        profiles = {}
        for name, recorder in self._recorders.items():
            try:
                recorder.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                recorder.kill()
                recorder.wait()
            output = self._path(name, ".txt")
            if recorder.returncode == 0 and output.exists():
                profiles[name] = {**summarize(parse_collapsed(output.read_text())), "file": str(output)}
            else:
                profiles[name] = {"error": _error(self._path(name, ".log"))}
        self._recorders.clear()
        return profiles


class ProcessWatch:
    """The measured window of a run: CPU time of its processes and, with a Profiler, their profiles.

    Enter it where the window starts and leave it where it ends; then `cpu` and `profiles` hold
    what was seen.
    """

    def __init__(self, pids: Mapping[str, int], profiler: Profiler | None = None):
        self.pids, self.profiler = dict(pids), profiler
        self.cpu: CpuWindow | None = None
        self.profiles: dict[str, dict] | None = None
        self._clock: CpuClock | None = None

    def __enter__(self) -> ProcessWatch:
        groups = {name: [pid] for name, pid in self.pids.items()}
        if self.profiler:
            self.profiler.start()
            if recorders := self.profiler.running_pids():
                groups["py-spy"] = recorders
        self._clock = CpuClock(groups)
        self._clock.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cpu = self._clock.stop()
        if self.profiler:
            self.profiles = self.profiler.stop()
