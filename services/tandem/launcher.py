"""`tandem up`: every service as a child process on loopback, stopped together."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tandem.core.config import dump_config
from tandem.coordinator.config import CoordinatorConfig
from tandem.cpu_sampler.config import SamplerConfig
from tandem.kv_store.config import KvStoreConfig
from tandem.presets import resolve
from tandem.stage_worker.config import StageWorkerConfig

READY_PREFIX = "tandem-service-ready "


def die_with_parent() -> None:
    """A child's preexec_fn: the child gets SIGTERM when this process dies (Linux; elsewhere nothing)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Launcher:
    """Starts services in dependency order, learns each one's address, stops them all."""

    def __init__(self, workdir: str | None = None, log_dir: str | None = None):
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="tandem-up-"))
        self.children: list[tuple[str, subprocess.Popen]] = []
        self.log_dir = Path(log_dir) if log_dir else self.workdir
        self.stages: list[str] = []  # addresses, filled in by up()
        self.samplers: list[str] = []

    def start(self, name: str, service: str, config: object, timeout_s: float = 300.0) -> str:
        """Start `tandem serve SERVICE` with `config`; return its address once it is ready."""
        path = self.workdir / f"{name}.yaml"
        path.write_text(dump_config(config))
        log = open(self.log_dir / f"{name}.log", "w")
        cmd = [sys.executable, "-m", "tandem.cli", "serve", service, "--config", str(path)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, preexec_fn=die_with_parent,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.children.append((name, proc))
        address: list[str] = []
        reader = threading.Thread(target=self._read_ready, args=(proc, address), daemon=True)
        reader.start()
        reader.join(timeout_s)
        if not address:
            self.stop()
            raise RuntimeError(f"{name} did not become ready; see {self.log_dir / (name + '.log')}")
        return address[0]

    @staticmethod
    def _read_ready(proc: subprocess.Popen, address: list[str]) -> None:
        for line in proc.stdout:
            if line.startswith(READY_PREFIX):
                address.append(line[len(READY_PREFIX):].strip())
                break

    def up(self, model: str, num_stages: int, num_samplers: int, port: int, host: str = "127.0.0.1",
           num_blocks: int = 512, block_size: int = 16, kv_store: bool = True, device: str = "cpu",
           preset: str = "full", stage_threads: int = 0, stage_boundaries: tuple[int, ...] = (),
           dtype: str = "auto") -> str:
        """Start a whole deployment; `preset` names the techniques switched on (see tandem.presets), `dtype`
        the stages' (auto, float32, bfloat16, float16),
        `stage_boundaries` the first layer of stages 1..N-1 (empty: an even split), `stage_threads` each stage's torch threads (0: this host's cores split between the stages, since
        they all run here; torch's default of every core per process oversubscribes them)."""
        techniques = resolve(preset)
        stage_threads = stage_threads or max(1, len(os.sched_getaffinity(0)) // num_stages)
        kv = self.start("kv-store", "kv_store", KvStoreConfig(host=host)) if kv_store else ""
        samplers: tuple[str, ...] = ()
        if techniques.cpu_sampling:
            sampler = SamplerConfig(host=host, **techniques.sampler_options())
            samplers = tuple(self.start(f"cpu-sampler-{i}", "cpu_sampler", sampler) for i in range(num_samplers))
        stages: list[str] = []
        for index in reversed(range(num_stages)):
            cfg = StageWorkerConfig(model=model, stage_index=index, num_stages=num_stages, host=host, device=device,
                                    next_stage=stages[0] if stages else "", kv_store=kv,
                                    num_blocks=num_blocks, block_size=block_size, num_threads=stage_threads,
                                    stage_boundaries=tuple(stage_boundaries), dtype=dtype,
                                    **techniques.stage_options(is_last=index == num_stages - 1))
            stages.insert(0, self.start(f"stage-worker-{index}", "stage_worker", cfg))
        samplers = samplers or (stages[-1],)  # without CPU sampling the last stage samples
        self.stages, self.samplers = stages, list(samplers)
        coordinator = CoordinatorConfig(model=model, stages=tuple(stages), samplers=samplers, kv_store=kv,
                                        host=host, port=port, num_blocks=num_blocks, block_size=block_size,
                                        **techniques.coordinator_options())
        return self.start("coordinator", "coordinator", coordinator)

    def first_exited(self) -> tuple[str, int] | None:
        for name, proc in self.children:
            if proc.poll() is not None:
                return name, proc.returncode
        return None

    def stop(self, grace_s: float = 10.0) -> None:
        for _, proc in reversed(self.children):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for _, proc in self.children:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.children.clear()
