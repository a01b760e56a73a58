"""The process's memory: its limit, what it holds, and what generation may take of the rest.

Pure functions over files the kernel writes (cgroup and /proc), each path injectable so tests
give them fake trees; and glibc's allocator, which both backends ask to give freed heap back. The runtime measures the resident memory once warm-up has touched every
buffer a request can meet but the batches' key/value memory (the baseline), and hands the engine
what is left under the limit less a margin as its budget (`budget`); the scheduler admits a row
only while the batch's worst case fits that budget.
"""

from __future__ import annotations

import ctypes
import functools
import re
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_STATUS = Path("/proc/self/status")

# cgroup v1 writes "no limit" as the page counter's maximum rounded to a page
# (9223372036854771712 on 4 KiB pages); nothing a machine holds comes near 2**62.
V1_UNLIMITED = 2**62

# The margin left under the limit beyond the baseline and the batches' worst case (see `margin`).
MARGIN_FLOOR = 64 << 20
MARGIN_SHARE = 0.08

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)


def parse_bytes(text: str | int) -> int:
    """Bytes from a plain integer or a size as Docker's `mem_limit` writes it: `1g`, `512m`,
    `1536Mi`, `2GiB`, `1073741824`. Every suffix is binary (k = 1024), as Docker reads them;
    a Kubernetes limit reaches the process in plain bytes through the Downward API."""
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE.match(text)
        if match is None:
            raise ValueError(f"{text!r} is not a size: an integer of bytes, or one with a suffix k, m, g or t "
                             "(binary, as Docker reads them: 1g, 512m, 1536Mi)")
        number, unit, _, _ = match.groups()
        value = int(float(number) * _UNITS[unit.lower()])
    if value <= 0:
        raise ValueError(f"a memory size must be positive, not {text!r}")
    return value


def cgroup_limit(root: Path = CGROUP_ROOT) -> int | None:
    """The memory limit of the cgroup this process sees at `root`, in bytes; None when there is
    none (v2's "max", v1's unlimited value) or no cgroup file to read (not Linux, no cgroupfs).

    In a container the cgroup namespace puts the container's own cgroup at /sys/fs/cgroup, which
    is where Docker's `mem_limit` and Kubernetes' `limits.memory` land."""
    v2 = root / "memory.max"
    if v2.is_file():
        value = v2.read_text().strip()
        return None if value == "max" else int(value)
    v1 = root / "memory" / "memory.limit_in_bytes"
    if v1.is_file():
        value = int(v1.read_text().strip())
        return None if value >= V1_UNLIMITED else value
    return None


def effective_limit(setting: int | None, root: Path = CGROUP_ROOT) -> tuple[int | None, str]:
    """(the limit to budget against, where it came from): MEMORY_LIMIT when set, else the
    cgroup's, else (None, "none")."""
    if setting is not None:
        return setting, "MEMORY_LIMIT"
    found = cgroup_limit(root)
    if found is not None:
        return found, f"the cgroup ({root})"
    return None, "none"


def _status_field(name: str, status: Path) -> int:
    for line in status.read_text().splitlines():
        if line.startswith(name + ":"):
            value, unit = line.split()[1:3]
            if unit != "kB":
                raise ValueError(f"{status}: {name} in {unit}, expected kB")
            return int(value) * 1024
    raise ValueError(f"{status} has no {name}")


def resident_bytes(status: Path = PROC_STATUS) -> int:
    """The process's resident memory now (VmRSS)."""
    return _status_field("VmRSS", status)


def peak_resident_bytes(status: Path = PROC_STATUS) -> int:
    """The most resident memory the process has held since it started (VmHWM)."""
    return _status_field("VmHWM", status)


def margin(limit: int) -> int:
    """What stays unbudgeted under `limit`: max(64 MiB, 8% of it).

    It covers what the baseline and the batches' worst case leave out: glibc's slack (freed
    chunks not yet returned, per-thread arenas: tens of MiB under load), the HTTP layer's
    per-request objects, prompt logits and tokenizer buffers, and what the cgroup counts that RSS
    does not (page cache of files read, kernel memory). It is not what keeps the batches in: on
    a DistilGPT2-shaped model, 8 rows filling the window through LiteRT batches under a 1 GiB
    limit peaked 44 MiB (fp32) and 145 MiB (int8) under baseline + `batch_bytes` of the rows
    admitted, the margin aside (in-process VmHWM; the HTTP layer's share under load is not
    measured yet, hence a floor rather than a figure fitted to these runs)."""
    return max(MARGIN_FLOOR, int(limit * MARGIN_SHARE))


def budget(limit: int | None, baseline: int, margin_bytes: int | None = None) -> int | None:
    """The bytes the batches' key/value memory may take: `limit` less the `baseline` (resident
    bytes measured after warm-up) less the margin (`margin(limit)` unless given); None when
    there is no limit, 0 when the baseline alone passes it."""
    if limit is None:
        return None
    if margin_bytes is None:
        margin_bytes = margin(limit)
    return max(0, limit - baseline - margin_bytes)


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The C library, where it is glibc (its allocator's controls); None elsewhere."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: leave the allocator as it is
        return None


def release_free_heap() -> None:
    """Hand freed heap memory back to the OS (malloc_trim(3)): glibc keeps it otherwise, and a
    batch's or warm-up's buffers would stay resident (and in the baseline the budget is taken from)."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)
