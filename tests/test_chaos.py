"""Clients that leave, stop strings, bursts past the queue bound: a live server on the tiny model
(both backends) under the traffic real clients make, and every answer it completes checked
exactly against the same request made alone on the idle server.

Greedy and seeded sampling are deterministic per row whatever shares the batch (prompt i draws
from its own stream of (seed, i)), so the solo run is the reference. Two reproductions from the
issue are kept as plain regression tests; the load test draws its mix from a printed seed
(CHAOS_SEED to replay one; CHAOS_SECONDS and CHAOS_CLIENTS for longer local runs).
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
from collections import Counter

import httpx
import pytest

from chat_models import CHATML, with_template
from chaos_clients import OVERLOADED, Call, Outcome, burst, random_call, run_call, same
from conftest import ENGINE_OPTIONS, served
from service.app import create_app

QUEUE = 16
MAX_PROMPTS = 8
CHAOS_SECONDS = float(os.environ.get("CHAOS_SECONDS", 8))  # per backend
CHAOS_CLIENTS = int(os.environ.get("CHAOS_CLIENTS", 16))
GAUGES = ("llm_queue_prompts", "llm_running_prompts", "llm_kv_slots_used", "llm_kv_bytes_reserved")


def settings_for(model_dir, **overrides):
    from service.config import Settings

    options = dict(model_dir=model_dir, max_batch_size=ENGINE_OPTIONS["max_batch_size"], served_model_name="tiny",
                   max_queue_size=64, max_prompts_per_request=32, max_tokens_limit=1000, max_total_tokens=32_000,
                   stream_interval_ms=10, batch_timeout_ms=0)
    return Settings(**(options | overrides))


@pytest.fixture(params=["litert", "tf"])
def backend(request):
    return request.param, request.getfixturevalue(f"{request.param}_engine")


def serve(engine, settings):
    return served(create_app(settings, engine_factory=lambda s: engine))


def gauges(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    found = {}
    for name in GAUGES:
        m = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        if m:
            found[name] = float(m.group(1))
    return found


def settle(url: str, seconds: float = 10) -> dict[str, float]:
    """The gauges once every one is 0, or as they are after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        now = gauges(url)
        if not any(now.values()) or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


# --- the reproductions ------------------------------------------------------------------

async def _hang_up_after_first_event(client: httpx.AsyncClient, body: dict) -> int:
    async with client.stream("POST", "/generate", json=body | {"stream": True}) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                break
        return r.status_code


def test_streams_that_all_hang_up_at_once_leave_the_batch_clean(backend, model_dir):
    """Issue: 4 greedy requests for 512 tokens, a 16-token one while they run, then 8 streams for
    1000 tokens each closed after their first event, then (once the server has seen them go)
    one ordinary request: that request got
    500 "generation failed: 17" (the batch kept rows the scheduler had dropped when every
    running row left at once)."""
    name, engine = backend
    ordinary = {"prompts": "The quick brown fox", "max_tokens": 16, "temperature": 0}

    async def scenario(url):
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            alone = await client.post("/generate", json=ordinary)
            assert alone.status_code == 200, alone.text
            long = [asyncio.ensure_future(client.post("/generate", json={
                "prompts": f"long {i}", "max_tokens": 512, "temperature": 0})) for i in range(4)]
            await asyncio.sleep(0.2)
            short = await client.post("/generate", json=ordinary)
            hung = await asyncio.gather(*[_hang_up_after_first_event(
                client, {"prompts": f"stream {i}", "max_tokens": 1000, "temperature": 0}) for i in range(8)])
            # Once the server has seen every hang-up (the last rows left with none joining), the
            # next request starts a batch of its own.
            await asyncio.to_thread(settle, url)
            after = await client.post("/generate", json=ordinary)
            longs = await asyncio.gather(*long)
            return alone, short, hung, after, longs

    with serve(engine, settings_for(model_dir)) as url:
        alone, short, hung, after, longs = asyncio.run(scenario(url))
        assert [r.status_code for r in longs] == [200] * 4, [r.text for r in longs]
        assert hung == [200] * 8
        assert (short.status_code, short.json()) == (200, alone.json())
        assert (after.status_code, after.json()) == (200, alone.json()), (name, after.text)
        again = httpx.post(url + "/generate", json=ordinary, timeout=60)
        assert (again.status_code, again.json()) == (200, alone.json())
        assert settle(url) == dict.fromkeys(gauges(url), 0.0)


def test_many_rows_ending_on_a_stop_string_never_overfill_the_batch(backend, model_dir):
    """Issue: 31 empty prompts, sampled, stop "0" on LiteRT got 500 "a batch holds at most 8
    rows" (a row ended by its stop string was counted twice as room). Each row's text must be
    what it is alone: prompt i samples from (seed, i), so row i of a one-prompt request with
    the same seed is not the reference; the same request rerun is, and so is its stop-free twin
    cut before the first "0"."""
    name, engine = backend
    body = {"prompts": [""] * 31, "max_tokens": 100, "stop": "0", "temperature": 1, "seed": 42}
    with serve(engine, settings_for(model_dir)) as url:
        r = httpx.post(url + "/generate", json=body, timeout=120)
        assert r.status_code == 200, (name, r.text)
        free = httpx.post(url + "/generate", json={k: v for k, v in body.items() if k != "stop"}, timeout=120)
        assert free.status_code == 200
        cut = [text.split("0")[0] for text in free.json()["results"]]
        assert r.json() == {"results": cut}
        assert sum("0" in text for text in free.json()["results"]) >= 3  # rows did stop early, others waiting
        again = httpx.post(url + "/generate", json=body, timeout=120)
        assert (again.status_code, again.json()) == (200, r.json())
        assert settle(url) == dict.fromkeys(gauges(url), 0.0)


def test_a_row_ended_by_a_stop_string_counts_its_tokens_up_to_the_stop(backend, model_dir):
    """Found by the load test on tf: a row ended by a stop string reported every token of its
    last decode call, past the stop, as generated (`generated_tokens`, /v1's
    `usage.completion_tokens`), so the count depended on how many steps that call ran: 16 alone
    (a plain row's call runs decode_chunk steps) but 2 with logprobs (one step a call) or under
    load. The count is the tokens up to the one that completes the stop string, as the
    log-probabilities list them."""
    name, engine = backend
    prompt = "é : x def = 日本"
    with serve(engine, settings_for(model_dir)) as url:
        free = httpx.post(url + "/generate", json={"prompts": prompt, "max_tokens": 16, "temperature": 0}).json()
        text = free["results"][0]
        stop = next(c for i, c in enumerate(text) if i >= 2 and c.isascii() and c.strip() and c not in text[:i])
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0, "stop": stop}
        scored = httpx.post(url + "/v1/completions", json=body | {"logprobs": 0}).json()
        plain = httpx.post(url + "/v1/completions", json=body).json()
        counted = len(scored["choices"][0]["logprobs"]["tokens"])
        assert scored["choices"][0]["text"] == plain["choices"][0]["text"] == text[:text.index(stop)]
        assert counted < 16
        assert scored["usage"]["completion_tokens"] == counted, (name, scored)
        assert plain["usage"]["completion_tokens"] == counted, (name, stop, plain)
        with httpx.stream("POST", url + "/generate", json={"prompts": prompt, "max_tokens": 16, "temperature": 0,
                                                          "stop": stop, "stream": True}) as r:
            final = [line for line in r.iter_lines() if "finish_reason" in line]
        assert f'"generated_tokens": {counted}}}' in final[0], (name, stop, final)


# --- the load test ------------------------------------------------------------------------------

def frequent_texts(url: str) -> list[str]:
    """Stop strings the tiny model reaches often: its three commonest characters in a few
    answers (greedy and seeded, so the same every run), and two of their two-character pairs."""
    r = httpx.post(url + "/generate", json={"prompts": ["", "The", "def f(", "1 2"], "max_tokens": 48,
                                            "temperature": 1, "seed": 7}, timeout=60)
    assert r.status_code == 200, r.text
    text = "".join(r.json()["results"])
    chars = [c for c, _ in Counter(text).most_common(3)]
    pairs = [p for p, _ in Counter(text[i:i + 2] for i in range(len(text) - 1)).most_common(2)]
    return chars + pairs


async def _client(url: str, rng: random.Random, stops: list[str], deadline: float, outcomes: list[Outcome]):
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        while time.monotonic() < deadline:
            if rng.random() < 0.03:
                calls = burst(rng, QUEUE // MAX_PROMPTS + 2, MAX_PROMPTS)
                outcomes += await asyncio.gather(*[run_call(client, c) for c in calls])
            else:
                outcomes.append(await run_call(client, random_call(rng, stops, max_prompts=MAX_PROMPTS,
                                                                   max_tokens=48)))


async def _load(url: str, seed: int, stops: list[str], seconds: float, clients: int) -> list[Outcome]:
    outcomes: list[Outcome] = []
    deadline = time.monotonic() + seconds
    await asyncio.gather(*[_client(url, random.Random(f"{seed}/{i}"), stops, deadline, outcomes)
                           for i in range(clients)])
    return outcomes


def refused_as_overloaded(o: Outcome) -> bool:
    """A full queue's answer: 503 on /generate, 429 on /v1, with Retry-After and saying so."""
    if o.status != OVERLOADED[o.call.path] or "retry-after" not in o.headers:
        return False
    message = o.body["detail"] if o.call.path == "/generate" else o.body["error"]["message"]
    return message.startswith("server busy")


def problems_of(outcomes: list[Outcome]) -> list[str]:
    bad = []
    for o in outcomes:
        if o.kind in ("200", "200 stream", "hung up", "abandoned") or refused_as_overloaded(o):
            if o.answer is not None and o.call.stream and o.answer["errors"]:
                bad.append(f"error event in a stream: {o.call} -> {o.answer['errors']}")
            elif o.call.stream and o.partial.get("errors"):
                bad.append(f"error event in a stream: {o.call} -> {o.partial['errors']}")
            continue
        bad.append(f"{o.kind}: {o.call} -> {o.body!r}")
    return bad


# A sampled row's logits under load differ from its solo run's in the last bits (about 1e-6 on
# LiteRT: the pool's slots sit elsewhere, the batch has other rows), so a draw that falls that
# close to the edge between two tokens can take the other one: once in about 2,000 sampled
# answers here (a draw 7e-9 from the edge, in the case examined). Greedy answers have no such
# edge and must always match; a few sampled ones may differ, a broken scheduler (wrong seed,
# stream or position, rows mixed up) would make most of them differ.
SAMPLED_FLIPS_ALLOWED = 2


def sampled(call: Call) -> bool:
    return call.body.get("temperature", 1.0) != 0


def mismatches(url: str, outcomes: list[Outcome]) -> tuple[list[str], list[str], int]:
    """Each completed answer (and each hung-up stream's texts, as prefixes) against the same
    request made alone on the idle server: the greedy answers that differ, the sampled ones
    that differ, and the number of solo runs made."""
    solo: dict[str, Outcome] = {}
    bad, flips = [], []

    async def check():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            for o in outcomes:
                if o.answer is None and not o.partial:
                    continue
                whole = o.call.read_whole()
                key = repr((whole.path, sorted(whole.body.items())))
                if key not in solo:
                    solo[key] = await run_call(client, whole)
                ref = solo[key]
                if ref.answer is None or (whole.stream and ref.answer["errors"]):
                    bad.append(f"alone it got {ref.kind}: {whole} -> {ref.body or ref.answer!r}")
                elif o.answer is not None and not same(o.answer, ref.answer):
                    (flips if sampled(whole) else bad).append(
                        f"under load {o.call}\n  got   {o.answer}\n  alone {ref.answer}")
                elif o.partial:
                    for i, (text, *_) in o.partial["rows"].items():
                        alone = ref.answer["rows"].get(i, [""])[0]
                        if not alone.startswith(text):
                            (flips if sampled(whole) else bad).append(
                                f"hung up on {o.call}: row {i} got {text!r}, alone {alone!r}")

    asyncio.run(check())
    return bad, flips, len(solo)


@pytest.fixture(scope="module")
def chat_model_dir(model_dir, tmp_path_factory):
    """The tiny model with a ChatML template, so the load's chat requests are served."""
    return with_template(model_dir, tmp_path_factory.mktemp("chaos-chat") / "model", CHATML)


def test_chaos_load_every_answer_is_the_solo_answer(backend, chat_model_dir):
    """CHAOS_CLIENTS clients for CHAOS_SECONDS doing what clients do (chaos_clients.random_call),
    now and then a burst past the queue bound. No 500 and no 5xx but a full queue's 503; every
    answer read whole equals the same request made alone; hung-up streams got a prefix of it;
    afterwards /health is ok and the queue and batch gauges fall back to 0."""
    name, engine = backend
    # Not the `random` module's own generator: a plugin (hypothesis's) seeds it the same for every test.
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(2**32))
    replay = f"[{name}] CHAOS_SEED={seed} CHAOS_SECONDS={CHAOS_SECONDS:g} CHAOS_CLIENTS={CHAOS_CLIENTS}"
    settings = settings_for(chat_model_dir, max_queue_size=QUEUE, max_prompts_per_request=MAX_PROMPTS,
                            max_tokens_limit=64, max_total_tokens=4096)
    with serve(engine, settings) as url:
        stops = frequent_texts(url)
        started = time.monotonic()
        outcomes = asyncio.run(_load(url, seed, stops, CHAOS_SECONDS, CHAOS_CLIENTS))
        loaded = time.monotonic() - started
        after = settle(url)
        health = httpx.get(url + "/health")
        checked = time.monotonic()
        wrong, flips, solo = mismatches(url, outcomes)
        summary = Counter(f"{o.call.path} {o.kind}" for o in outcomes)
        line = (f"{replay}: {len(outcomes)} calls in {loaded:.1f} s, stops {stops!r}, {solo} solo runs in "
                f"{time.monotonic() - checked:.1f} s, {len(flips)} sampled answers flipped; " + ", ".join(f"{k}: {v}" for k, v in sorted(summary.items())))
        print(line)
        bad = problems_of(outcomes)
        assert not bad, line + "\n" + "\n".join(bad[:20] + ["", "and against the solo runs:"] + wrong[:5])
        assert (health.status_code, health.json()["status"]) == (200, "ok"), line
        # The kv gauges are checked when the server has them (GAUGES).
        assert after == dict.fromkeys(after, 0.0) and {"llm_queue_prompts", "llm_running_prompts"} <= set(after), \
            (line, after)
        assert not wrong, line + "\n" + "\n".join(wrong[:10])
        assert len(flips) <= SAMPLED_FLIPS_ALLOWED, line + "\n" + "\n".join(flips[:10])
        # A full queue refuses much of the load (bursts and 8-prompt requests against a bound of
        # 16); enough must still be served for the comparison to mean something.
        assert sum(o.answer is not None for o in outcomes) >= 50, line
