"""A `tandem up` deployment run as a subprocess, for benchmarks that load it from outside:
start it, find the services it started, read their memory from /proc, and stop them all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def start_up(options: list[str], log_dir: str) -> tuple[subprocess.Popen, str]:
    """`tandem up --port 0 --log-dir LOG_DIR OPTIONS...`, once it is ready: (its process, its endpoint)."""
    cmd = [sys.executable, "-m", "tandem.cli", "up", "--port", "0", *options, "--log-dir", log_dir]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("tandem ready on "):
            return proc, line.split()[-1]
    proc.wait()
    raise RuntimeError(f"tandem up exited ({proc.returncode}) before it was ready; see the logs in {log_dir}")


def services_of(pid: int) -> dict[str, int]:
    """The services `tandem up` started: {name (its config's file name): pid}."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            config = config_of(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
        if parent == pid and config:
            found[Path(config).stem] = int(stat.parent.name)
    return found


def config_of(pid: int) -> str:
    """The --config of a `tandem serve` process; "" for any other process."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    return argv[argv.index("--config") + 1] if "--config" in argv[:-1] else ""


def memory_mb(pid: int) -> dict[str, float]:
    """Resident memory now and its peak so far (MiB), from /proc/PID/status."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return {"rss_mb": round(fields["VmRSS"], 1), "peak_rss_mb": round(fields["VmHWM"], 1)}


def stop(proc: subprocess.Popen, services: dict[str, int]) -> None:
    """Stop `tandem up` (SIGTERM), then kill any of its services still running."""
    configs = {}
    for pid in services.values():
        try:
            configs[pid] = config_of(pid)
        except OSError:  # it has exited already
            pass
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid, config in configs.items():  # a service tandem up did not stop (the same process: same config)
        try:
            if config_of(pid) == config:
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass
