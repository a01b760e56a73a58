"""Clients that misbehave the way real ones do, for tests/test_chaos.py: they stream and hang up
after a few events, abandon a request half-way, send bursts past the queue bound, mix the three
APIs (`/generate`, `/v1/completions`, `/v1/chat/completions`), stop strings, `n`, echo with
logprobs and many prompts in one request.

Every call is described by a `Call` (the path, the JSON body, and what the client does with
the answer); `run_call` performs it with an `httpx.AsyncClient` and returns an `Outcome`: the
status and, when the client read the answer to its end, the `answer` in a form that does not
depend on the request (no ids, no timestamps) so that it can be compared with the same call
made alone on an idle server. A random mix comes from `random_call(rng, ...)` so that a seed
reproduces it.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from dataclasses import dataclass, field

import httpx

# What a client does with its answer.
READ = "read"          # read it whole (streamed or not)
HANG_UP = "hang_up"    # streamed: close the connection after `events` events
ABANDON = "abandon"    # not streamed: cancel the request after `after` seconds

# Statuses a well-formed request may get under load: the queue is full.
OVERLOADED = {"/generate": 503, "/v1/completions": 429, "/v1/chat/completions": 429}


@dataclass(frozen=True)
class Call:
    path: str
    body: dict
    action: str = READ
    events: int = 0       # HANG_UP: how many events to read first
    after: float = 0.0    # ABANDON: seconds before giving up

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    def read_whole(self) -> Call:
        """The same request, read to its end (what the reference runs)."""
        return Call(self.path, self.body)


@dataclass
class Outcome:
    """What one call got. `kind` is the summary's key; `answer` is set when the whole answer
    was read (comparable across runs); `partial` holds the texts a hung-up stream received."""

    call: Call
    status: int | None
    kind: str
    answer: object = None
    partial: dict = field(default_factory=dict)
    body: object = None       # the error body, for the failure message
    headers: dict = field(default_factory=dict)


def comparable(path: str, payload: dict) -> object:
    """A non-streamed 200's body without what differs between identical requests."""
    if path == "/generate":
        return payload
    return {"choices": payload["choices"], "usage": payload["usage"], "model": payload["model"]}


def same(a, b) -> bool:
    """Equal, but log-probabilities (the only floats in an answer) to 1e-4: the batch a row
    shares changes the shapes its logits are computed in, and fp32 sums in another order
    (1e-6 apart under load); texts and tokens are exact."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def assemble(path: str, events: list) -> dict:
    """A streamed answer as {index: [text, finish]} plus any error event, from its `data:` payloads."""
    rows: dict[int, list] = {}
    errors = []
    usage = None
    for e in events:
        if e == "[DONE]":
            continue
        if "error" in e:
            errors.append(e["error"])
            continue
        if path == "/generate":
            row = rows.setdefault(e["index"], ["", None, None])
            row[0] += e["text"]
            if "finish_reason" in e:
                row[1] = e["finish_reason"]
                row[2] = e["generated_tokens"]
        else:
            if e.get("usage"):
                usage = e["usage"]
            for c in e["choices"]:
                row = rows.setdefault(c["index"], ["", None, None])
                row[0] += (c["delta"].get("content") or "") if "delta" in c else c["text"]
                row[1] = c["finish_reason"] or row[1]
                if c.get("logprobs"):  # how the lists split into chunks depends on timing: joined
                    row[2] = {k: (row[2] or {}).get(k, []) + (v or []) for k, v in c["logprobs"].items()}
    return {"rows": {i: rows[i] for i in sorted(rows)}, "errors": errors, "usage": usage}


def _payloads(lines: list[str]) -> list:
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def run_call(client: httpx.AsyncClient, call: Call) -> Outcome:
    """Make `call` as its client would. Transport errors are outcomes too ("transport")."""
    if call.action == ABANDON:
        task = asyncio.ensure_future(_plain(client, call))
        done, _ = await asyncio.wait({task}, timeout=call.after)
        if not done:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            return Outcome(call, None, "abandoned")
        return task.result()
    if call.stream:
        return await _streamed(client, call)
    return await _plain(client, call)


async def _plain(client: httpx.AsyncClient, call: Call) -> Outcome:
    try:
        r = await client.post(call.path, json=call.body)
    except httpx.TransportError as exc:
        return Outcome(call, None, f"transport:{type(exc).__name__}", body=repr(exc))
    if r.status_code == 200:
        return Outcome(call, 200, "200", answer=comparable(call.path, r.json()))
    return _refused(call, r.status_code, r.content, r.headers)


async def _streamed(client: httpx.AsyncClient, call: Call) -> Outcome:
    try:
        async with client.stream("POST", call.path, json=call.body) as r:
            if r.status_code != 200:
                return _refused(call, r.status_code, await r.aread(), r.headers)
            if not r.headers["content-type"].startswith("text/event-stream"):
                return Outcome(call, 200, "200 not a stream", body=r.headers["content-type"])
            lines, events = [], 0
            async for line in r.aiter_lines():
                lines.append(line)
                if line.startswith("data: "):
                    events += 1
                    if call.action == HANG_UP and events >= call.events:
                        break
            payloads = _payloads(lines)
    except httpx.TransportError as exc:
        return Outcome(call, None, f"transport:{type(exc).__name__}", body=repr(exc))
    whole = assemble(call.path, payloads)
    if payloads and payloads[-1] == "[DONE]":
        return Outcome(call, 200, "200 stream", answer=whole)
    if call.action == HANG_UP:
        return Outcome(call, 200, "hung up", partial=whole)
    return Outcome(call, 200, "200 stream without [DONE]", body=lines[-5:])


def _refused(call: Call, status: int, content: bytes, headers) -> Outcome:
    try:
        body = json.loads(content)
    except ValueError:
        body = content[:500]
    return Outcome(call, status, str(status), body=body, headers=dict(headers))


# --- a random mix -------------------------------------------------------------------------------

WORDS = ["The", "quick", "brown", "fox", "def", "main", "(", ")", ":", "1", "2", "hello", "world", "日本",
         "é", "🎉", "\n", "  ", "return", "x", "=", "import", "os", ","]


def random_prompt(rng: random.Random) -> str:
    if rng.random() < 0.1:
        return ""
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))


def random_call(rng: random.Random, stops: list[str], *, max_prompts: int, max_tokens: int) -> Call:
    """One request from the mix: any of the three APIs, streamed or not, read whole, hung up on or
    abandoned, greedy or seeded sampling, with stop strings, `n`, logprobs (echo on
    `/v1/completions`), several prompts (a conversation on chat)."""
    api = rng.random()
    v1, chat = 0.15 <= api < 0.45, api < 0.15
    stream = rng.random() < 0.45
    tokens = rng.choice([1, 2, rng.randint(3, 16), rng.randint(3, 16), rng.randint(16, max_tokens)])
    sampling = {"temperature": 0} if rng.random() < 0.4 else {"temperature": round(rng.uniform(0.7, 1.3), 2),
                                                              "seed": rng.randrange(2**32)}
    prompts = [random_prompt(rng) for _ in range(rng.choice([1, 1, 1, 2, 3, max_prompts]))]
    body: dict = {"max_tokens": tokens, **sampling}
    if rng.random() < 0.35:
        chosen = rng.sample(stops, rng.randint(1, min(3, len(stops))))
        body["stop"] = chosen[0] if len(chosen) == 1 and rng.random() < 0.5 else chosen
    if chat:
        n = rng.choice([1, 1, 2, 3]) if 3 <= max_prompts else 1
        messages = [{"role": "user", "content": p} for p in prompts[:2]]
        if rng.random() < 0.3:
            messages.insert(0, {"role": "system", "content": random_prompt(rng)})
        body |= {"model": "tiny", "messages": messages}
        if n > 1:
            body["n"] = n
        if rng.random() < 0.25:
            body |= {"logprobs": True, "top_logprobs": rng.randint(0, 3)}
        if stream and rng.random() < 0.3:
            body["stream_options"] = {"include_usage": True}
    elif v1:
        n = rng.choice([1, 1, 2, 3]) if len(prompts) * 3 <= max_prompts else 1
        body |= {"model": "tiny", "prompt": prompts[0] if len(prompts) == 1 and rng.random() < 0.5 else prompts}
        if n > 1:
            body["n"] = n
        if rng.random() < 0.25:
            body["logprobs"] = rng.randint(0, 3)
            if rng.random() < 0.6 and all(prompts):  # echo scores the prompt: it needs a token
                body["echo"] = True
        if stream and rng.random() < 0.3:
            body["stream_options"] = {"include_usage": True}
    else:
        body["prompts"] = prompts[0] if len(prompts) == 1 and rng.random() < 0.5 else prompts
    if stream:
        body["stream"] = True
    path = "/v1/chat/completions" if chat else "/v1/completions" if v1 else "/generate"
    roll = rng.random()
    if stream and roll < 0.3:
        return Call(path, body, HANG_UP, events=rng.randint(1, 4))
    if not stream and roll < 0.15:
        return Call(path, body, ABANDON, after=rng.uniform(0.005, 0.3))
    return Call(path, body)


def burst(rng: random.Random, size: int, prompts: int) -> list[Call]:
    """`size` requests of `prompts` prompts each, sent at once: together past the queue bound."""
    calls = []
    for _ in range(size):
        body = {"max_tokens": rng.randint(2, 24), "temperature": 0}
        many = [random_prompt(rng) for _ in range(prompts)]
        if rng.random() < 0.5:
            calls.append(Call("/generate", body | {"prompts": many}))
        else:
            calls.append(Call("/v1/completions", body | {"model": "tiny", "prompt": many}))
    return calls
