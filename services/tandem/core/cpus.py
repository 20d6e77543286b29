"""Which cores a process runs on and how many torch threads it uses.

OpenMP threads that share a core with another busy process do not slow down a little, they
collapse (a stage with two torch threads ran 17 times slower while another process held one
of its two cores). So each stage and sampler process is pinned to its own cores at start-up
(`place_process`), with exactly as many torch intra-op threads as it has cores, and one
inter-op thread. `plan_cores` is the launcher's side: which cores each process of a one-host
deployment gets, and what it must say when there are too few.

Core lists are written as Linux writes them (`taskset -c`, cpusets): "0-3,8,10-11".
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# The priority (nice value) of the samplers, coordinator and KV store when no core is left over
# for them and they run among the stages: a stage's step then keeps its core, and the others take
# what the stages leave (each stage waits for the other part of every step). See CorePlan.
SHARED_NICE = 19
CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """"0-3,8" -> (0, 1, 2, 3, 8), sorted and without repeats; "" -> (). ValueError if malformed."""
    cpus: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, sep, high = part.partition("-")
        try:
            first, last = int(low), int(high if sep else low)
        except ValueError:
            raise ValueError(f"{part!r} is not a core number or a range such as 0-3") from None
        if first < 0 or last < first:
            raise ValueError(f"{part!r} is not a range of core numbers (low-high, low <= high, from 0)")
        cpus.update(range(first, last + 1))
    return tuple(sorted(cpus))


def format_cpu_list(cpus: Sequence[int]) -> str:
    """(0, 1, 2, 3, 8) -> "0-3,8"; the inverse of parse_cpu_list."""
    parts: list[str] = []
    ordered = sorted(set(cpus))
    start = prev = None
    for cpu in [*ordered, None]:
        if cpu is not None and prev is not None and cpu == prev + 1:
            prev = cpu
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = cpu
    return ",".join(parts)


def cpus_field(name: str, text: str) -> tuple[int, ...]:
    """A config field holding a core list, parsed; ConfigError naming the field if malformed."""
    from tandem.core.errors import ConfigError

    try:
        return parse_cpu_list(text)
    except ValueError as e:
        raise ConfigError(f"config field {name!r}={text!r}: {e}") from None


def usable_cpus() -> tuple[int, ...]:
    """The cores this process may run on now (its affinity)."""
    try:
        return tuple(sorted(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return tuple(range(os.cpu_count() or 1))


def cpu_quota() -> float | None:
    """The container's CPU limit in cores (cgroup CFS quota / period), or None when unlimited."""
    try:
        if CGROUP_V2_CPU_MAX.exists():
            quota, period = CGROUP_V2_CPU_MAX.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        if CGROUP_V1_QUOTA.exists():
            quota_us = int(CGROUP_V1_QUOTA.read_text())
            return None if quota_us <= 0 else quota_us / int(CGROUP_V1_PERIOD.read_text())
    except (OSError, ValueError):
        pass
    return None


def default_num_threads(cpus: Sequence[int]) -> int:
    """One thread per core the process may use, no more than the container's CPU limit allows."""
    quota = cpu_quota()
    return max(1, min(len(cpus), int(quota)) if quota is not None else len(cpus))


@dataclass(frozen=True)
class Placement:
    """What a process really has, read back from the OS and torch."""

    cpus: tuple[int, ...]  # os.sched_getaffinity
    num_threads: int  # torch intra-op threads
    num_interop_threads: int  # torch inter-op threads


def current_placement() -> Placement:
    """The calling thread's affinity and torch's thread counts."""
    import torch

    return Placement(usable_cpus(), torch.get_num_threads(), torch.get_num_interop_threads())


def limit_interop_threads() -> None:
    """One torch inter-op thread: services run one model call at a time, and the inter-op pool
    would only add threads to compete for the cores. Possible only before torch runs parallel
    work; later calls (a test process hosting several services) leave it as it is."""
    import torch

    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        log.debug("torch inter-op threads already fixed at %d", torch.get_num_interop_threads())


# glibc's mallopt parameters
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20  # the most glibc accepts: blocks under it come from the heap, reused
TRIM_THRESHOLD = 1 << 30  # free memory at the heap's top kept for the next step, up to this
TOP_PAD = 64 << 20


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of giving it back to the kernel.

    A step allocates tensors of megabytes (a decode step's gathered keys, activations, logits) and
    frees them at its end. With glibc's defaults each one is a fresh mmap or a regrown heap top,
    so the next step touches new pages: a decode attention of 32 sequences x 512 tokens took 14 ms
    instead of 5 here, all of it page faults. Returns whether the settings were taken; skipped
    (False) off glibc, or when the process runs another allocator (LD_PRELOAD of tcmalloc or
    jemalloc) or the user set MALLOC_* variables, which then win.
    """
    if "malloc" in os.environ.get("LD_PRELOAD", "") or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return all(libc.mallopt(param, value) == 1 for param, value in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
    except (OSError, AttributeError):
        return False


def place_process(cpus: Sequence[int], num_threads: int, who: str = "this process") -> Placement:
    """Pin every thread of this process to `cpus` (empty: leave the affinity as it is) and give
    torch `num_threads` intra-op threads (0: one per core it may use, see default_num_threads)
    and one inter-op thread. Call at start-up, before the process starts its own threads.

    Raises ConfigError naming `cpus` when the OS refuses the cores (not in the process's
    cpuset). Logs a warning when there are more threads than cores: they would take turns.
    """
    import torch

    from tandem.core.errors import ConfigError

    limit_interop_threads()
    if cpus:
        allowed = usable_cpus()
        for tid in _thread_ids():  # sched_setaffinity(0) would pin only the calling thread
            try:
                os.sched_setaffinity(tid, cpus)
            except ProcessLookupError:  # the thread ended meanwhile
                pass
            except OSError as e:
                raise ConfigError(f"config field 'cpus'={format_cpu_list(cpus)!r}: {who} may not run there "
                                  f"({e.strerror}); it may use {format_cpu_list(allowed)}") from None
    usable = usable_cpus()
    threads = num_threads or default_num_threads(usable)
    torch.set_num_threads(threads)
    placement = current_placement()
    if placement.num_threads > len(placement.cpus):
        log.warning("%s runs %d torch threads on %d cores (%s): they take turns, and OpenMP slows down many "
                    "times over when its threads wait for one another", who, placement.num_threads,
                    len(placement.cpus), format_cpu_list(placement.cpus))
    log.info("%s: cores %s, %d torch threads, %d inter-op", who, format_cpu_list(placement.cpus),
             placement.num_threads, placement.num_interop_threads)
    return placement


def _thread_ids() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


@dataclass(frozen=True)
class CorePlan:
    """Cores of a one-host deployment: disjoint sets for the stages, the rest for the others."""

    stages: tuple[tuple[int, ...], ...]  # each stage's cores
    stage_threads: int  # torch threads of each stage
    others: tuple[int, ...]  # cores of the samplers, coordinator and KV store
    others_float: bool  # no core was left over: the others run on every core, among the stages
    warnings: tuple[str, ...]  # where processes outnumber cores
    # The others' nice value: SHARED_NICE when they float among CPU stages, else 0. On the engine
    # run of docs/benchmarks.md the coordinator's slices otherwise took 12-16% of each stage's
    # step time, about 8% at nice 19. GPU stages' threads launch and wait: it stays 0 there.
    others_nice: int = 0

    def describe(self) -> list[str]:
        """What the plan is, a line each, warnings last."""
        stages = ", ".join(f"stage {i} on {format_cpu_list(c)}" for i, c in enumerate(self.stages))
        others = f"share {format_cpu_list(self.others)}"
        if self.others_float:
            others += " with the stages (no core left over)"
        if self.others_nice:
            others += f", at nice {self.others_nice}"
        return [f"cores: {stages} ({_count(self.stage_threads, 'torch thread')} each); "
                f"samplers, coordinator and KV store {others}", *self.warnings]


def plan_cores(available: Sequence[int], num_stages: int, num_samplers: int, stage_threads: int = 0) -> CorePlan:
    """Give each stage its own cores out of `available`.

    `stage_threads` 0 gives each stage an equal share of the cores, keeping one core per sampler
    plus one for the coordinator and KV store when there are that many beyond one per stage;
    the others share what the stages leave, or every core when they leave none. Where stages
    need more cores than there are (more stages than cores, or `stage_threads` too large), the
    stages share cores round-robin and `warnings` says so, rather than failing.
    """
    cores = tuple(sorted(set(available)))
    n = len(cores)
    if n < 1 or num_stages < 1:
        raise ValueError(f"need at least one core and one stage, got {n} cores and {num_stages} stages")
    if not stage_threads:
        spare = min(num_samplers + 1, max(0, n - num_stages))
        stage_threads = max(1, (n - spare) // num_stages)
    stages = tuple(tuple(sorted({cores[(i * stage_threads + k) % n] for k in range(stage_threads)}))
                   for i in range(num_stages))
    warnings = []
    if num_stages * stage_threads > n:
        holders = {c: [i for i, s in enumerate(stages) if c in s] for c in cores}
        shared = [f"stages {', '.join(map(str, h[:-1]))} and {h[-1]} share core {c}"
                  for c, h in holders.items() if len(h) > 1]
        warnings.append(
            f"the stages need {num_stages * stage_threads} cores ({_count(num_stages, 'stage')} x "
            f"{_count(stage_threads, 'torch thread')}) and there are {n}: {'; '.join(shared) or 'threads outnumber cores'}; "
            "OpenMP threads that wait for a core slow down many times over")
    used = {c for s in stages for c in s}
    others = tuple(c for c in cores if c not in used)
    return CorePlan(stages, stage_threads, others or cores, not others, tuple(warnings), 0 if others else SHARED_NICE)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
