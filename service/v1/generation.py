"""What /v1/completions and /v1/chat/completions share: the checks before anything is queued,
the rows' submission to the scheduler, and the delivery of their text (collected, or as
OpenAI's server-sent chunks). Each route keeps only its own protocol: how a request becomes
prompts, and how a piece of a choice is written."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from service import observability
from service.config import Settings
from service.engine import GenerationRow, OverMemoryBudget
from service.errors import OpenAIError
from service.routes import RETRY_AFTER, check_total_tokens
from service.runtime import Runtime
from service.streaming import ChoiceDelta, completion_deltas, sse_event
from service.v1.protocol import ErrorResponse, Usage

MAX_STOPS = 16
ERRORS = {status: {"model": ErrorResponse, "description": why} for status, why in [
    (400, "Invalid request (also a body that is not JSON), a field this server does not support, a prompt too "
          "long for the context window, or more new tokens than MAX_TOTAL_TOKENS"),
    (404, "No such model"),
    (413, "The body is over MAX_BODY_BYTES"),
    (429, "The queue is full (see Retry-After)"),
    (500, "Generation failed"),
    (503, "The model is loading, or the server is shutting down (see Retry-After)"),
]}
for _status in (429, 503):
    ERRORS[_status]["headers"] = RETRY_AFTER


def check_model(model: str, settings: Settings) -> None:
    if model != settings.model_name:
        raise OpenAIError(404, f"The model '{model}' does not exist; this server serves '{settings.model_name}'",
                          param="model", code="model_not_found")


def check_limits(settings: Settings, rows: int, max_tokens: int, temperature: float, stops: Sequence[str],
                 rows_name: str = "prompts x n", tokens_param: str = "max_tokens") -> None:
    """The settings' bounds on one request: max_tokens, temperature, rows, total new tokens, stops.
    `tokens_param` is the field the new tokens were asked for in."""
    if max_tokens > settings.max_tokens_limit:
        raise OpenAIError(400, f"{tokens_param} is {max_tokens}, over this server's limit of "
                          f"{settings.max_tokens_limit}", param=tokens_param)
    if temperature > settings.max_temperature:
        raise OpenAIError(400, f"temperature is {temperature}, over this server's limit of {settings.max_temperature}",
                          param="temperature")
    if rows > settings.max_prompts_per_request:
        raise OpenAIError(400, f"{rows_name} is {rows}, over this server's limit of "
                          f"{settings.max_prompts_per_request}", param="n")
    over = check_total_tokens(settings, rows * max_tokens, rows, max_tokens)
    if over:
        raise OpenAIError(400, over, param=tokens_param)
    if len(stops) > MAX_STOPS or any(not stop for stop in stops):
        raise OpenAIError(400, f"stop takes 1 to {MAX_STOPS} non-empty strings", param="stop")


def context_exceeded(engine, prompt_tokens: int, max_tokens: int, param: str) -> OpenAIError:
    return OpenAIError(
        400, f"This model's maximum context length is {engine.context_window} tokens, however you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in your prompt; {max_tokens} for the completion). "
        "Please reduce your prompt or completion length.", param=param, code="context_length_exceeded")


def check_fits(engine, prompts: Sequence[Sequence[int]], max_tokens: int, param: str = "prompt",
               tokens_param: str = "max_tokens") -> None:
    """Each prompt with max_tokens fits the context window, and a batch holding it alone the
    memory budget (else it could never run)."""
    for ids in prompts:
        if len(ids) + max_tokens > engine.context_window:
            raise context_exceeded(engine, len(ids), max_tokens, param)
        try:
            engine.check_fits(0, ids, max_tokens)
        except OverMemoryBudget as problem:
            raise OpenAIError(400, str(problem).replace("prompt 0", "a prompt", 1), param=tokens_param,
                              code="over_memory_budget") from None


@dataclass(frozen=True)
class Sampling:
    """A request's sampling fields, OpenAI's nulls resolved to their defaults."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    logprobs: int | None = None

    @classmethod
    def of(cls, body, logprobs: int | None) -> Sampling:
        return cls(temperature=1.0 if body.temperature is None else body.temperature,
                   top_p=1.0 if body.top_p is None else body.top_p, top_k=max(body.top_k or 0, 0),
                   repetition_penalty=body.repetition_penalty or 1.0, seed=body.seed, logprobs=logprobs)


def rows_for(prompts: Sequence[Sequence[int]], n: int, max_tokens: int, sampling: Sampling) -> list[GenerationRow]:
    """Choice i * n + j is prompt i's j-th sample: its own random stream of the seed (a fresh
    random seed without one)."""
    seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
    return [GenerationRow(tuple(ids), max_tokens, sampling.temperature, seed, i * n + j, top_k=sampling.top_k,
                          top_p=sampling.top_p, repetition_penalty=sampling.repetition_penalty,
                          logprobs=sampling.logprobs)
            for i, ids in enumerate(prompts) for j in range(n)]


def submit(runtime: Runtime, scheduler, engine, rows: list[GenerationRow], *, stream: bool,
           stops: Sequence[str]):
    """Queue the rows; return the scheduler's request and its choices' deltas (text cut before
    the first stop string)."""
    request = scheduler.submit(rows, stream=stream, interval=runtime.settings.stream_interval_ms / 1000, stops=stops)
    observability.attach(request)
    return request, completion_deltas(request, engine.decode, stops, engine.byte_fallback_ids)


def count_prompt(runtime: Runtime, prompt_tokens: int) -> None:
    runtime.metrics.requests.inc()
    runtime.metrics.prompt_tokens.inc(prompt_tokens)


@dataclass
class Collected:
    """One choice's whole output: its text, OpenAI's finish_reason, its token count, and its
    tokens' log-probability entries (TokenLogprob) when asked for."""

    text: str = ""
    finish: str | None = None
    tokens: int = 0
    logprobs: list = field(default_factory=list)


async def collect(deltas: AsyncIterator[list[ChoiceDelta]], choices: int) -> list[Collected]:
    out = [Collected() for _ in range(choices)]
    async for batch in deltas:
        for d in batch:
            c = out[d.index]
            c.text += d.text
            c.tokens = d.tokens
            c.logprobs += d.logprobs
            if d.finish is not None:
                c.finish = openai_finish(d.finish)
    return out


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


async def chunk_stream(deltas: AsyncIterator[list[ChoiceDelta]], choice_pieces: Callable[[ChoiceDelta], list[dict]],
                       envelope: dict, prompt_tokens: int, include_usage: bool, runtime: Runtime,
                       first: Sequence[dict] = ()) -> AsyncIterator[str]:
    """OpenAI's stream: a chunk (`envelope` with one choice) per piece `choice_pieces` makes of
    each delta, after the `first` pieces; with include_usage, every chunk has `"usage": null`
    and a chunk with no choices and the usage comes last; then [DONE]. A failure after the
    status went out is an error event before [DONE]."""
    tokens: dict[int, int] = {}
    extra = {"usage": None} if include_usage else {}

    def chunk(choice: dict) -> str:
        return sse_event({**envelope, "choices": [choice], **extra})

    try:
        if first:
            yield "".join(chunk(choice) for choice in first)
        async for batch in deltas:
            lines = []
            for d in batch:
                runtime.metrics.generated_tokens.inc(d.tokens - tokens.get(d.index, 0))
                tokens[d.index] = d.tokens
                lines += [chunk(choice) for choice in choice_pieces(d)]
            yield "".join(lines)
    except Exception as exc:  # the status has gone out: say so in the stream
        yield sse_event({"error": {"message": f"generation failed: {exc}", "type": "server_error", "param": None,
                               "code": None}})
    else:
        if include_usage:
            done = usage(prompt_tokens, sum(tokens.values()))
            yield sse_event({**envelope, "choices": [], "usage": done.model_dump()})
    yield "data: [DONE]\n\n"


def openai_finish(reason: str | None) -> str | None:
    """OpenAI's finish_reason: "length" for max_tokens, "stop" for end-of-text or a stop string."""
    return None if reason is None else "length" if reason == "length" else "stop"
