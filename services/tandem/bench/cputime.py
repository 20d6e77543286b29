"""Where the machine's cores went during the measured window: CPU time per process.

Each process's user + system time comes from /proc/PID/stat (which already sums the
process's threads); this process's own comes from time.process_time, so the bench client is
measured even where there is no /proc. A process whose time cannot be read (no /proc, or it
exited) is left unmeasured, and then the idle share cannot be told either.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

IDLE = "idle"


def parse_stat_cpu_ticks(stat: str) -> int:
    """utime + stime, in clock ticks, from the text of /proc/PID/stat.

    The second field (comm) is in parentheses and may itself hold spaces and ')', so the
    fields are counted from after the last ')': there utime and stime are the 12th and 13th.
    """
    fields = stat[stat.rindex(")") + 1:].split()
    return int(fields[11]) + int(fields[12])


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds process `pid` has used so far, every thread together; None if unreadable."""
    if pid == os.getpid():
        return time.process_time()
    try:
        with open(f"/proc/{pid}/stat") as f:
            return parse_stat_cpu_ticks(f.read()) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def total_cpu_s(pids: Sequence[int]) -> float | None:
    """CPU seconds of several processes together; None if any of them is unreadable."""
    values = [process_cpu_s(pid) for pid in pids]
    return None if None in values else sum(values)


def machine_ticks(stat: str | None = None) -> tuple[int, int] | None:
    """(busy, total) clock ticks of every core together, from /proc/stat's first line (or
    `stat`, its text); busy is all but idle and iowait. None where there is no /proc/stat."""
    if stat is None:
        try:
            with open("/proc/stat") as f:
                stat = f.readline()
        except OSError:
            return None
    fields = [int(x) for x in stat.split()[1:9]]  # user nice system idle iowait irq softirq steal
    return sum(fields) - fields[3] - fields[4], sum(fields)


def wait_until_quiet(busy_below: float = 0.15, max_wait_s: float = 30.0, interval_s: float = 0.5,
                     ticks: Callable[[], tuple[int, int] | None] = machine_ticks,
                     sleep: Callable[[float], None] = time.sleep) -> float | None:
    """Wait until the cores were less than `busy_below` busy over an interval (what a run before
    left running, a server still stopping or the kernel reclaiming its memory, would otherwise
    slow the next run's stage profile and its start), at most `max_wait_s`. Returns the busy
    share of the last interval, or None where it cannot be read."""
    busy = None
    for _ in range(max(1, round(max_wait_s / interval_s))):
        before = ticks()
        sleep(interval_s)
        after = ticks()
        if before is None or after is None or after[1] <= before[1]:
            return None
        busy = (after[0] - before[0]) / (after[1] - before[1])
        if busy < busy_below:
            break
    return busy


@dataclass(frozen=True)
class CpuWindow:
    """CPU seconds each named process used over `wall_s` seconds of wall time; None: unmeasured."""

    wall_s: float
    cpu_s: Mapping[str, float | None]


class CpuClock:
    """Reads the CPU time of named groups of processes at `start` and `stop`."""

    def __init__(self, pids: Mapping[str, Sequence[int]]):
        self.pids = dict(pids)
        self._start: dict[str, float | None] = {}
        self._start_wall = 0.0

    def start(self) -> None:
        self._start = {name: total_cpu_s(pids) for name, pids in self.pids.items()}
        self._start_wall = time.perf_counter()

    def stop(self) -> CpuWindow:
        wall_s = time.perf_counter() - self._start_wall
        end = {name: total_cpu_s(pids) for name, pids in self.pids.items()}
        return CpuWindow(wall_s, {name: None if end[name] is None or self._start[name] is None
                                  else end[name] - self._start[name] for name in self.pids})


def cpu_by_process(window: CpuWindow, num_cores: int) -> dict[str, dict[str, float | None]]:
    """{name: {"cpu_s", "share"}}, share of num_cores * wall_s, most first, then "idle": the rest.

    Idle is what none of the named processes used (other processes on the machine included);
    it is None when a process was unmeasured.
    """
    capacity_s = window.wall_s * num_cores
    out = {name: {"cpu_s": cpu, "share": None if cpu is None or capacity_s <= 0 else cpu / capacity_s}
           for name, cpu in sorted(window.cpu_s.items(), key=lambda item: -(item[1] or 0))}
    measured = [cpu for cpu in window.cpu_s.values() if cpu is not None]
    idle_s = capacity_s - sum(measured) if len(measured) == len(window.cpu_s) else None
    out[IDLE] = {"cpu_s": idle_s, "share": None if idle_s is None or capacity_s <= 0 else idle_s / capacity_s}
    return out
