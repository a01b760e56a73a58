"""Who used the CPU during a measurement: the measured processes, or someone else.

On a shared 2-core machine a neighbour's work slows one side of a ratio and not the other
(PyTorch's OpenMP threads, for one, slow down several times when a core is taken away). Each
phase therefore records the cores its own processes used and the cores everything else on the
machine used, from /proc/stat and /proc/PID/stat; the report flags phases that were not alone.

Standard library only: bench.baseline imports it in the PyTorch venv too.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
# Above this many cores used by other processes, a phase is flagged as shared.
SHARED_CORES = 0.25


def system_busy_seconds() -> float:
    """CPU seconds spent by all cores outside idle and iowait since boot (steal excluded)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / TICK


def process_cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of the given live processes (utime and stime in /proc/PID/stat)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            continue
    return total / TICK


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class CpuWindow:
    """Cores used by `ours()` and by everything else between start() and stop()."""

    def __init__(self, ours):
        self._ours = ours

    def start(self) -> "CpuWindow":
        self._t0, self._busy0, self._ours0 = time.monotonic(), system_busy_seconds(), self._ours()
        return self

    def stop(self) -> dict:
        wall = time.monotonic() - self._t0
        busy = system_busy_seconds() - self._busy0
        ours = self._ours() - self._ours0
        if wall <= 0:
            return {"own_cores": None, "other_cores": None}
        return {"own_cores": round(ours / wall, 2), "other_cores": round(max(busy - ours, 0.0) / wall, 2)}
