"""The service under test as a child process: start it, wait for health, read its metrics and memory."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.cpu import CpuWindow, own_cpu_seconds, process_cpu_seconds

REPO = Path(__file__).resolve().parent.parent


class ServiceError(RuntimeError):
    """The service did not start, died, or answered something the benchmark cannot read."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format → {metric name: value summed over its label sets}."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name_part, _, rest = line.partition(" ")
        if "{" in line:
            name_part = line.split("{", 1)[0]
            rest = line.rsplit("}", 1)[1]
        try:
            value = float(rest.split()[0])
        except (IndexError, ValueError):
            continue
        values[name_part] = values.get(name_part, 0.0) + value
    return values


def parse_labels(text: str, metric: str) -> list[dict[str, str]]:
    """The label sets of `metric` in Prometheus text, e.g. llm_backend_info{backend="litert"}."""
    found = []
    for line in text.splitlines():
        if line.startswith(metric + "{"):
            body = line[len(metric) + 1:].rsplit("}", 1)[0]
            found.append(dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', body)))
    return found


def parse_histogram(text: str, metric: str) -> dict[float, float]:
    """The cumulative bucket counts of a Prometheus histogram, {le: count}, summed over other labels."""
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if not line.startswith(metric + "_bucket{"):
            continue
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', line.split("{", 1)[1].rsplit("}", 1)[0]))
        try:
            le, value = float(labels["le"]), float(line.rsplit("}", 1)[1].split()[0])
        except (KeyError, IndexError, ValueError):
            continue
        buckets[le] = buckets.get(le, 0.0) + value
    return buckets


def histogram_quantile(buckets: dict[float, float], q: float) -> float | None:
    """The q-quantile (0-1) of cumulative `buckets`, interpolated within its bucket as Prometheus's
    histogram_quantile does; in the +Inf bucket, the largest finite bound."""
    edges = sorted(buckets)
    total = buckets[edges[-1]] if edges else 0
    if not total:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for le in edges:
        if buckets[le] >= rank:
            if le == float("inf"):
                return lower
            span = buckets[le] - below
            return lower + (le - lower) * ((rank - below) / span if span else 1.0)
        lower, below = le, buckets[le]
    return lower


def histogram_window(before: str, after: str, metric: str) -> dict:
    """A histogram's observations between two /metrics texts: count, mean, p50 and p95 (seconds)."""
    b0, b1 = parse_histogram(before, metric), parse_histogram(after, metric)
    if not b1:
        return {"count": None, "mean_s": None, "p50_s": None, "p95_s": None}
    delta = {le: b1[le] - b0.get(le, 0.0) for le in b1}
    m0, m1 = parse_metrics(before), parse_metrics(after)
    count = m1.get(metric + "_count", 0.0) - m0.get(metric + "_count", 0.0)
    total = m1.get(metric + "_sum", 0.0) - m0.get(metric + "_sum", 0.0)
    return {"count": int(round(count)), "mean_s": total / count if count else None,
            "p50_s": histogram_quantile(delta, 0.5), "p95_s": histogram_quantile(delta, 0.95)}


def proc_status_kb(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def descendants(pid: int) -> list[int]:
    """Child processes of `pid`, recursively (a server may fork workers)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class ServerProcess:
    """A server under test as a child process on a free loopback port, in its own session:
    started by `with`, ready once GET /health answers 200 with {"status": "ok"}, stopped (its
    whole process group) on exit from the block. Its memory and CPU are read from /proc, the
    same way whatever the server: bench/llamacpp.py's peer is one too."""

    name = "server"  # what its errors call it

    def __init__(self, log_path: Path, health_timeout: float = 600.0, cwd: Path = REPO):
        self.log_path = log_path
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.health_timeout = health_timeout
        self.cwd = cwd
        self.env: dict[str, str] = dict(os.environ)
        self.proc: subprocess.Popen | None = None
        self.warmup_seconds: float | None = None
        self.health: dict | None = None  # the body of the first /health that said ok

    def command(self) -> list[str]:
        raise NotImplementedError

    def __enter__(self):
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        started = time.monotonic()
        self._warmup_cpu = CpuWindow(lambda: self.cpu_seconds() + own_cpu_seconds()).start()
        self.proc = subprocess.Popen(
            self.command(), cwd=self.cwd, env=self.env,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            self._wait_healthy(started)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_healthy(self, started: float) -> None:
        deadline = started + self.health_timeout
        statuses = set()
        with httpx.Client(base_url=self.base_url, timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise ServiceError(f"{self.name} exited with {self.proc.returncode} during warm-up:\n{self.log_tail()}")
                try:
                    r = client.get("/health")
                    statuses.add(r.status_code)
                    if r.status_code == 200 and r.json().get("status") == "ok":
                        self.warmup_seconds = time.monotonic() - started
                        self.health = r.json()
                        self.warmup_cpu = self._warmup_cpu.stop()
                        self.health_statuses = sorted(statuses)
                        return
                except httpx.TransportError:
                    pass  # not listening yet
                time.sleep(0.1)
        raise ServiceError(f"{self.name} not healthy after {self.health_timeout:.0f} s:\n{self.log_tail()}")

    def metrics_text(self) -> str:
        r = httpx.get(self.base_url + "/metrics", timeout=30.0)
        if r.status_code != 200:
            raise ServiceError(f"GET /metrics answered {r.status_code}")
        return r.text

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self.metrics_text())

    def memory(self) -> dict:
        """VmHWM (peak resident) and VmRSS of the server process and any children, in MiB."""
        pids = [self.proc.pid] + descendants(self.proc.pid)
        hwm = [proc_status_kb(p, "VmHWM") or 0 for p in pids]
        rss = [proc_status_kb(p, "VmRSS") or 0 for p in pids]
        return {"vmhwm_mib": sum(hwm) / 1024, "vmrss_mib": sum(rss) / 1024, "processes": len(pids)}

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by the server process and its children (0 before it starts)."""
        if self.proc is None:
            return 0.0
        return process_cpu_seconds([self.proc.pid] + descendants(self.proc.pid))

    def reset_peak(self) -> bool:
        """Reset VmHWM to the current RSS, so the next reading is the peak of what follows.

        Writing 5 to /proc/PID/clear_refs does that (Linux >= 4.0, see proc(5)); False if not allowed.
        """
        done = True
        for pid in [self.proc.pid] + descendants(self.proc.pid):
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            except OSError:
                done = False
        return done

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # The server leads its own session: signal the group, so any workers go too.
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if not self._log.closed:
            self._log.close()


class Service(ServerProcess):
    """`python -m service` on a free loopback port, stopped on exit from the `with` block."""

    name = "service"

    def __init__(self, model_dir: Path, log_path: Path, extra_env: dict[str, str] | None = None,
                 python: str = sys.executable, health_timeout: float = 600.0):
        super().__init__(log_path, health_timeout)
        self.model_dir = model_dir
        self.env.update({"MODEL_DIR": str(model_dir), "HOST": "127.0.0.1", "PORT": str(self.port)})
        self.env.update(extra_env or {})
        self.python = python

    def command(self) -> list[str]:
        return [self.python, "-m", "service"]
