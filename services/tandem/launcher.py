"""`tandem up`: every service as a child process on loopback, stopped together."""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tandem.coordinator.config import CoordinatorConfig
from tandem.core.config import dump_config
from tandem.core.cpus import CorePlan, format_cpu_list, plan_cores, usable_cpus
from tandem.core.modeling.profile import balanced_split, load_profile
from tandem.core.modeling.stages import parse_boundaries
from tandem.core.wire.tls import TlsConfig
from tandem.cpu_sampler.config import SamplerConfig
from tandem.gateway.config import GatewayConfig
from tandem.kv_store.config import KvStoreConfig
from tandem.presets import resolve
from tandem.stage_worker.config import StageWorkerConfig

READY_PREFIX = "tandem-service-ready "
# A stage on a GPU uses its cores to launch kernels and move frames; its host-side tensor work is
# small, and more OpenMP threads would only spin on cores its other threads need.
GPU_STAGE_THREADS = 1


def add_layout_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--stage-boundaries, --stage-threads, the micro-batch shape and --stream-interval, as `tandem
    up` and `tandem bench` take them (see Launcher.up)."""
    def boundaries(text: str) -> tuple[int, ...] | str:
        try:
            return parse_boundaries(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parser.add_argument("--stage-boundaries", type=boundaries, default=(),
                        help="first layer of stages 1..N-1, comma-separated, or 'auto': profile the model first and "
                             "split the layers so that the stages take equal time, LM head included (default: an "
                             "even split of the layers)")
    parser.add_argument("--stage-threads", type=int, default=0,
                        help="torch threads, and cores of its own, of each stage (default: 0, an equal share of the "
                             "cores; the rest go to the samplers, coordinator and KV store)")
    parser.add_argument("--max-in-flight", type=int, default=0,
                        help="micro-batches in flight through the pipeline (default: 0, one per stage)")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="most sequences in one micro-batch (default: 64)")
    parser.add_argument("--stream-interval", type=int, default=1,
                        help="a Generate stream sends a request's first token at once, then its tokens in chunks of "
                             "this many (the coordinator's stream_interval; `tandem bench` gives the vLLM runs' "
                             "servers the same; default: 1)")


def die_with_parent() -> None:
    """A child's preexec_fn: the child gets SIGTERM when this process dies (Linux; elsewhere nothing)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Launcher:
    """Starts services in dependency order, learns each one's address, stops them all.

    `say` gets every line about how the deployment is laid out (each process's cores, cores
    shared by stages, the layer split); `notes` and `warnings` keep them for reports.
    """

    def __init__(self, workdir: str | None = None, log_dir: str | Path | None = None,
                 say: Callable[[str], None] = lambda line: None):
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="tandem-up-"))
        self.children: list[tuple[str, subprocess.Popen]] = []
        self.log_dir = Path(log_dir) if log_dir else self.workdir
        self.stages: list[str] = []  # addresses, filled in by up()
        self.samplers: list[str] = []  # every sampler service, the last stage's own included when it hosts one
        self.gateway = ""  # host:port of the OpenAI-compatible gateway, when up() started one
        self.notes: list[str] = []  # what up() said about the layout
        self.warnings: list[str] = []  # the notes that say something is oversubscribed
        self._say = say

    def say(self, line: str, warning: bool = False) -> None:
        (self.warnings if warning else self.notes).append(line)
        self._say(("warning: " if warning else "") + line)

    def start(self, name: str, service: str, config: object, timeout_s: float = 300.0,
              cpus: Sequence[int] = (), nice: int = 0) -> str:
        """Start `tandem serve SERVICE` with `config` (pinned to `cpus` when given, at priority
        `nice`); return its address once it is ready."""
        path = self.workdir / f"{name}.yaml"
        path.write_text(dump_config(config))
        cmd = [sys.executable, "-m", "tandem.cli", "serve", service, "--config", str(path)]
        proc = self._spawn(name, cmd, cpus, stdout=subprocess.PIPE, nice=nice)
        address: list[str] = []
        reader = threading.Thread(target=self._read_ready, args=(proc, address), daemon=True)
        reader.start()
        reader.join(timeout_s)
        if not address:
            self.stop()
            log = self.log_dir / f"{name}.log"
            raise RuntimeError(f"{name} did not become ready; see {log}{_last_error(log)}")
        return address[0]

    def _spawn(self, name: str, cmd: list[str], cpus: Sequence[int], stdout: Any, nice: int = 0) -> subprocess.Popen:
        def before_exec() -> None:  # in the child
            die_with_parent()
            if cpus:
                os.sched_setaffinity(0, cpus)
            if nice:
                os.nice(nice)

        log = open(self.log_dir / f"{name}.log", "w")
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=log, text=True, preexec_fn=before_exec,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.children.append((name, proc))
        return proc

    @staticmethod
    def _read_ready(proc: subprocess.Popen, address: list[str]) -> None:
        for line in proc.stdout:
            if line.startswith(READY_PREFIX):
                address.append(line[len(READY_PREFIX):].strip())
                break

    def up(self, model: str, num_stages: int, num_samplers: int, port: int, host: str = "127.0.0.1",
           num_blocks: int = 512, block_size: int = 16, kv_store: bool = True, device: str = "cpu",
           preset: str = "full", stage_threads: int = 0, stage_boundaries: tuple[int, ...] | str = (),
           dtype: str = "auto", balance_at: tuple[int, int] | None = None, max_in_flight: int = 0,
           max_num_seqs: int = 64, gateway_port: int | None = None, tls: TlsConfig | None = None,
           step_logs: bool = False, prefix_caching: bool = True, max_queue: int = 256,
           stream_interval: int = 1) -> str:
        """Start a whole deployment; `preset` names the techniques switched on (see tandem.presets),
        `dtype` the stages' (auto, float32, bfloat16, float16).

        Each stage gets cores of its own and as many torch threads (`stage_threads` each, 0: an
        equal share, see plan_cores), or GPU_STAGE_THREADS on a GPU; the samplers, coordinator, KV
        store and gateway share the cores left over, or all of them at plan.others_nice
        (core.cpus.SHARED_NICE) when none is. `stage_boundaries` is the first layer of stages
        1..N-1, empty for an even split, or "auto": profile the model on stage 0's cores first and split
        the layers so that the stages take equal time, LM head included, for a decode step of
        `balance_at` (tokens, context; default: profile_stage's). `max_in_flight` and
        `max_num_seqs` shape the coordinator's micro-batches, `max_queue` bounds its waiting requests
        and `stream_interval` is how many tokens its streams send a message (see CoordinatorConfig).
        With `gateway_port` (0: any free port) the OpenAI-compatible gateway starts too, at
        `self.gateway`. With `tls` every
        service speaks mutual TLS to the others and the public API serves TLS (see tandem.core.wire.tls).
        With `step_logs` every stage logs its steps to `self.step_logs[i]` (StageWorkerConfig.step_log);
        `prefix_caching` is the coordinator's enable_prefix_caching.
        """
        tls = tls or TlsConfig()
        techniques = resolve(preset)
        plan = plan_cores(usable_cpus(), num_stages, num_samplers if techniques.cpu_sampling else 0, stage_threads)
        if device != "cpu":
            plan = dataclasses.replace(plan, stage_threads=GPU_STAGE_THREADS, others_nice=0)
        for i, line in enumerate(plan.describe()):
            self.say(line, warning=i > 0)
        others = () if plan.others_float else plan.others
        if isinstance(stage_boundaries, str):  # AUTO
            stage_boundaries = self.balance(model, num_stages, device, plan, dtype, balance_at)
        nice = plan.others_nice
        kv = self.start("kv-store", "kv_store", KvStoreConfig(host=host, tls=tls), cpus=others, nice=nice) if kv_store else ""
        samplers: tuple[str, ...] = ()
        if techniques.cpu_sampling:
            sampler = SamplerConfig(model=model, host=host, cpus=format_cpu_list(others), tls=tls, **techniques.sampler_options())
            samplers = tuple(self.start(f"cpu-sampler-{i}", "cpu_sampler", sampler, nice=nice) for i in range(num_samplers))
        stages: list[str] = []
        for index in reversed(range(num_stages)):
            cfg = StageWorkerConfig(model=model, stage_index=index, num_stages=num_stages, host=host, device=device,
                                    next_stage=stages[0] if stages else "", kv_store=kv,
                                    last_stage=stages[-1] if index == 0 and stages and techniques.decode_chaining else "",
                                    num_blocks=num_blocks, block_size=block_size, num_threads=plan.stage_threads,
                                    cpus=format_cpu_list(plan.stages[index]), stage_boundaries=tuple(stage_boundaries),
                                    dtype=dtype, tls=tls, samplers=samplers if index == num_stages - 1 else (),
                                    step_log=str(self.workdir / f"steps-{index}.jsonl") if step_logs else "",
                                    **techniques.stage_options(is_last=index == num_stages - 1))
            stages.insert(0, self.start(f"stage-worker-{index}", "stage_worker", cfg))
        samplers = samplers or (stages[-1],)  # without CPU sampling the last stage samples
        hosts_argmax = techniques.coordinator_options()["greedy_on_stage"]  # and beside the replicas, argmax rows
        self.stages, self.samplers = stages, [*samplers, *([stages[-1]] if hosts_argmax else [])]
        self.step_logs = [self.workdir / f"steps-{i}.jsonl" for i in range(num_stages)] if step_logs else []
        coordinator = CoordinatorConfig(model=model, stages=tuple(stages), samplers=samplers, kv_store=kv,
                                        host=host, port=port, num_blocks=num_blocks, block_size=block_size,
                                        max_in_flight=max_in_flight, max_num_seqs=max_num_seqs, max_queue=max_queue,
                                        tls=tls, enable_prefix_caching=prefix_caching, stream_interval=stream_interval,
                                        **techniques.coordinator_options())
        address = self.start("coordinator", "coordinator", coordinator, cpus=others, nice=nice)
        if gateway_port is not None:
            gateway = GatewayConfig(host=host, port=gateway_port, coordinator=address, model=model,
                                    coordinator_tls_ca_file=tls.ca_file)
            self.gateway = self.start("gateway", "gateway", gateway, cpus=others, nice=nice)
        return address

    def balance(self, model: str, num_stages: int, device: str, plan: CorePlan, dtype: str = "auto",
                balance_at: tuple[int, int] | None = None, timeout_s: float = 600.0) -> tuple[int, ...]:
        """Profile one layer and the LM head with a stage's cores and threads (profile_stage, in a
        process of its own), and return the boundaries of the balanced split."""
        out = self.workdir / "stage-profile.json"
        cmd = [sys.executable, "-m", "tandem.tools.profile_stage", "--model", model, "--device", device,
               "--dtype", dtype, "--cpus", format_cpu_list(plan.stages[0]), "--threads", str(plan.stage_threads), "--out", str(out)]
        if balance_at:
            cmd += ["--balance-at", f"{balance_at[0]},{balance_at[1]}"]
        proc = self._spawn("profile-stage", cmd, (), stdout=subprocess.DEVNULL)
        try:
            code = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        else:
            self.children.remove(("profile-stage", proc))  # done: not a service that may exit
        if code != 0:
            self.stop()
            raise RuntimeError(f"profiling the stages failed; see {self.log_dir / 'profile-stage.log'}")
        split = balanced_split(load_profile(out), num_stages, *(balance_at or ()))
        self.say(f"stage boundaries auto {list(split.boundaries)} from {out}: {split.describe()}")
        return split.boundaries

    def first_exited(self) -> tuple[str, int] | None:
        for name, proc in self.children:
            if proc.poll() is not None:
                return name, proc.returncode
        return None

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the front (gateway, coordinator) first, so that it drains while the stages and
        samplers still run, then the rest; whatever outlives `grace_s` in all is killed."""
        deadline = time.monotonic() + grace_s
        front = [(n, p) for n, p in self.children if n in ("gateway", "coordinator")]
        for group in (front, [(n, p) for n, p in self.children if (n, p) not in front]):
            for _, proc in reversed(group):
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for _, proc in group:
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.children.clear()


def _last_error(log: Path) -> str:
    """What a service that died said last (`tandem serve: ...` or an exception's line), or ""."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return f": {lines[-1]}" if lines else ""
