"""The load generator: N concurrent clients share a fixed list of /generate requests.

Each client sends one request at a time and takes the next unsent one when it has its answer,
so at most N requests are in flight. A 503 (the queue is full: an intended answer) is counted
and the same request is sent again after the server's Retry-After (capped), so every scenario
generates the same work; its latency runs from the first attempt to the answer. Anything else
that is not a 200 with one string per prompt is an error.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httpx

MAX_RETRY_WAIT = 2.0
MAX_ATTEMPTS = 50


@dataclass
class RequestOutcome:
    prompt: str
    latency: float | None = None  # seconds, first attempt to answer; None unless answered 200
    text: str | None = None
    rejected_503: int = 0  # how many attempts got an intended 503
    error: str | None = None


@dataclass
class LoadResult:
    wall_seconds: float
    outcomes: list[RequestOutcome] = field(default_factory=list)


def retry_after(response: httpx.Response) -> float:
    try:
        return min(max(float(response.headers.get("retry-after", "0.5")), 0.05), MAX_RETRY_WAIT)
    except ValueError:
        return 0.5


async def send(client: httpx.AsyncClient, body: dict, outcome: RequestOutcome) -> None:
    start = time.perf_counter()
    for _ in range(MAX_ATTEMPTS):
        try:
            r = await client.post("/generate", json=body)
        except httpx.HTTPError as exc:
            outcome.error = f"{type(exc).__name__}: {exc}"
            return
        if r.status_code == 503:
            outcome.rejected_503 += 1
            await asyncio.sleep(retry_after(r))
            continue
        if r.status_code != 200:
            outcome.error = f"HTTP {r.status_code}: {r.text[:200]}"
            return
        try:
            results = r.json()["results"]
            if not (isinstance(results, list) and len(results) == 1 and isinstance(results[0], str)):
                raise ValueError(f"expected one string, got {results!r:.100}")
        except (ValueError, KeyError, TypeError) as exc:
            outcome.error = f"bad body: {exc}"
            return
        outcome.text = results[0]
        outcome.latency = time.perf_counter() - start
        return
    outcome.error = f"still 503 after {MAX_ATTEMPTS} attempts"


async def _drive(base_url: str, clients: int, bodies: list[dict], timeout: float) -> LoadResult:
    outcomes = [RequestOutcome(prompt=b["prompts"][0]) for b in bodies]
    next_index = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as client:

        async def one_client() -> None:
            nonlocal next_index
            while next_index < len(bodies):
                i = next_index
                next_index += 1
                await send(client, bodies[i], outcomes[i])

        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        wall = time.perf_counter() - start
    return LoadResult(wall_seconds=wall, outcomes=outcomes)


def run_load(base_url: str, clients: int, bodies: list[dict], timeout: float = 900.0) -> LoadResult:
    return asyncio.run(_drive(base_url, clients, bodies, timeout))


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation, as numpy's default."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
