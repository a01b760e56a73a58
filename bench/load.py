"""The load generator: N concurrent clients share a fixed list of streamed /generate requests.

Each client sends one request at a time and takes the next unsent one when it has its answer,
so at most N requests are in flight. Every request streams (bench/client.py's
`stream_request`, with its 503 handling): besides the whole latency and the full text, the
client sees when the first token came and how many tokens the server generated (the final
event's `generated_tokens`), which give each request's time to first token and time per
output token.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httpx

from bench.client import StreamOutcome, stream_request


@dataclass
class LoadResult:
    wall_seconds: float
    outcomes: list[StreamOutcome] = field(default_factory=list)


async def _drive(base_url: str, clients: int, bodies: list[dict], timeout: float, transport=None,
                 request=stream_request) -> LoadResult:
    outcomes: list[StreamOutcome | None] = [None] * len(bodies)
    next_index = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits,
                                 transport=transport) as client:

        async def one_client() -> None:
            nonlocal next_index
            while next_index < len(bodies):
                i = next_index
                next_index += 1
                outcomes[i] = await request(client, bodies[i])

        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        wall = time.perf_counter() - start
    return LoadResult(wall_seconds=wall, outcomes=outcomes)


def run_load(base_url: str, clients: int, bodies: list[dict], timeout: float = 900.0,
             transport: httpx.AsyncBaseTransport | None = None, request=stream_request) -> LoadResult:
    """`clients` clients share `bodies` (one prompt each); outcomes in the order of `bodies`.
    `transport` stands in for the network in tests. `request(client, body)` sends one body and
    returns its StreamOutcome: our /generate by default, bench/llamacpp.py's for the peer, which
    takes the same bodies."""
    return asyncio.run(_drive(base_url, clients, bodies, timeout, transport, request))


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation, as numpy's default."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
