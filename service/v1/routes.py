"""The OpenAI-compatible front door: /v1/models and /v1/completions onto the same scheduler as
POST /generate (one batch may mix both). Errors are answered in OpenAI's envelope
(service/errors.py)."""

import secrets
import time
import uuid
from dataclasses import dataclass

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from service import observability
from service.config import Settings
from service.engine import GenerationRow, OverMemoryBudget, TokenLogprob
from service.errors import OpenAIError
from service.runtime import Runtime
from service.routes import RETRY_AFTER, KeyDocs, RuntimeDep, check_total_tokens
from service.schemas import event_stream
from service.streaming import ChoiceDelta, completion_deltas, sse_event, unless_disconnected
from service.v1.protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse,
                                 ErrorResponse, ModelCard, ModelList, Usage)

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


def create_v1_router(settings: Settings) -> APIRouter:
    key = KeyDocs(settings, error_body=ErrorResponse)
    router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"], dependencies=key.dependencies,
                       responses=key.responses)
    created = int(time.time())

    @router.get("/models", response_model=ModelList)
    async def models() -> ModelList:
        """The one model this server serves."""
        return ModelList(data=[ModelCard(id=settings.model_name, created=created)])

    @router.post("/completions", response_model=CompletionResponse,
                 responses={200: {"content": event_stream("A `text_completion` chunk as JSON (choices and, with "
                                                          "include_usage, usage), an `error` object, or `[DONE]`"),
                                  "description": "The completion; with `stream`, OpenAI's chunks as server-sent events"},
                            **ERRORS})
    async def completions(body: CompletionRequest, runtime: RuntimeDep, http: Request):
        """OpenAI's legacy completions: docs/api.md's table says what each field does here."""
        engine, scheduler = runtime.ready_engine()
        if body.model != settings.model_name:
            raise OpenAIError(404, f"The model '{body.model}' does not exist; this server serves "
                              f"'{settings.model_name}'", param="model", code="model_not_found")
        refused = body.unsupported()
        if refused:
            raise OpenAIError(400, refused[1], param=refused[0], code="unsupported_parameter")
        prompts = _prompt_ids(body.prompt, engine)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        n = body.n or 1
        temperature = 1.0 if body.temperature is None else body.temperature
        _check_limits(body, settings, len(prompts) * n, max_tokens, temperature)
        if isinstance(body.prompt, str) or (body.prompt and isinstance(body.prompt[0], str)):
            prompt_texts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        else:
            prompt_texts = [engine.decode(ids) for ids in prompts]
        for ids in prompts:
            if len(ids) + max_tokens > engine.context_window:
                raise OpenAIError(
                    400, f"This model's maximum context length is {engine.context_window} tokens, however you "
                    f"requested {len(ids) + max_tokens} tokens ({len(ids)} in your prompt; {max_tokens} for the "
                    "completion). Please reduce your prompt or completion length.",
                    param="prompt", code="context_length_exceeded")
            try:
                engine.check_fits(0, ids, max_tokens)
            except OverMemoryBudget as problem:
                raise OpenAIError(400, str(problem).replace("prompt 0", "a prompt", 1), param="max_tokens",
                                  code="over_memory_budget") from None
        seed = body.seed if body.seed is not None else secrets.randbits(63)
        # Choice i * n + j is prompt i's j-th sample: its own random stream of the seed.
        controls = dict(top_k=max(body.top_k or 0, 0), top_p=1.0 if body.top_p is None else body.top_p,
                        repetition_penalty=body.repetition_penalty or 1.0, logprobs=body.logprobs)
        rows = [GenerationRow(tuple(ids), max_tokens, temperature, seed, i * n + j, **controls)
                for i, ids in enumerate(prompts) for j in range(n)]
        echoes = [_Echo(prompt_texts[i // n] if body.echo else "", len(prompt_texts[i // n]), None)
                  for i in range(len(rows))]
        if body.echo and body.logprobs is not None:
            scored = [await _prompt_logprobs(engine, scheduler, ids, body.logprobs) for ids in prompts]
            echoes = [_Echo(e.text, e.offset, _lists(engine, scored[i // n], 0)) for i, e in enumerate(echoes)]
        reply = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": settings.model_name}
        prompt_tokens = sum(len(ids) for ids in prompts)
        runtime.metrics.requests.inc()
        runtime.metrics.prompt_tokens.inc(prompt_tokens)
        stops = body.stops
        if max_tokens == 0:  # echo alone: the prompts scored, nothing generated
            request, deltas = None, _nothing(len(rows))
        else:
            request = scheduler.submit(rows, stream=bool(body.stream), interval=settings.stream_interval_ms / 1000,
                                       stops=stops)
            observability.attach(request)
            deltas = completion_deltas(request, engine.decode, stops)
        want_logprobs = body.logprobs is not None
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_chunks(deltas, reply, echoes, want_logprobs, prompt_tokens, include_usage,
                                             runtime, engine),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        collected = _collect(deltas, echoes, want_logprobs, engine)
        choices = await (collected if request is None else unless_disconnected(collected, request, http))
        if choices is None:  # the client is gone: nobody reads this
            return Response(status_code=499)
        completion_tokens = sum(tokens for _, tokens in choices)
        runtime.metrics.generated_tokens.inc(completion_tokens)
        return CompletionResponse(**reply, choices=[c for c, _ in choices],
                                  usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                              total_tokens=prompt_tokens + completion_tokens))

    return router


def _prompt_ids(prompt, engine) -> list[list[int]]:
    """Each prompt's token ids: strings are encoded; ids are checked against the vocabulary."""
    if isinstance(prompt, str):
        return [engine.encode(prompt)]
    if not prompt:
        raise OpenAIError(400, "prompt must not be empty", param="prompt")
    if isinstance(prompt[0], str):
        return [engine.encode(p) for p in prompt]
    prompts = [prompt] if isinstance(prompt[0], int) else prompt
    for ids in prompts:
        if not ids:
            raise OpenAIError(400, "a token-id prompt must hold at least one token", param="prompt")
        bad = next((t for t in ids if not 0 <= t < engine.vocab_size), None)
        if bad is not None:
            raise OpenAIError(400, f"token id {bad} is outside the vocabulary (0 to {engine.vocab_size - 1})",
                              param="prompt")
    return [list(ids) for ids in prompts]


def _check_limits(body: CompletionRequest, settings: Settings, rows: int, max_tokens: int, temperature: float) -> None:
    if max_tokens < 1 and not body.echo:
        raise OpenAIError(400, "max_tokens must be at least 1 (0 only with echo)", param="max_tokens")
    if max_tokens > settings.max_tokens_limit:
        raise OpenAIError(400, f"max_tokens is {max_tokens}, over this server's limit of {settings.max_tokens_limit}",
                          param="max_tokens")
    if temperature > settings.max_temperature:
        raise OpenAIError(400, f"temperature is {temperature}, over this server's limit of {settings.max_temperature}",
                          param="temperature")
    if rows > settings.max_prompts_per_request:
        raise OpenAIError(400, f"prompts x n is {rows}, over this server's limit of {settings.max_prompts_per_request}",
                          param="n")
    over = check_total_tokens(settings, rows * max_tokens, rows, max_tokens)
    if over:
        raise OpenAIError(400, over, param="max_tokens")
    if len(body.stops) > MAX_STOPS or any(not stop for stop in body.stops):
        raise OpenAIError(400, f"stop takes 1 to {MAX_STOPS} non-empty strings", param="stop")


@dataclass(frozen=True)
class _Echo:
    """What a choice starts with: the prompt's text with echo (else ""), where its completion's
    text offsets start (the prompt's length), and the prompt's log-probability lists."""

    text: str
    offset: int
    logprobs: CompletionLogprobs | None


async def _prompt_logprobs(engine, scheduler, ids: list[int], top: int) -> list[tuple[int, TokenLogprob | None]]:
    # On the scheduler's thread, between decode calls: the engine's decoder is the batch's.
    try:
        scored = await scheduler.call(engine.prompt_logprobs, ids, top)
    except NotImplementedError as exc:
        raise OpenAIError(400, f"echo with logprobs: {exc}", param="echo") from None
    return list(zip(ids, scored))


def _lists(engine, entries: list[tuple[int, TokenLogprob | None]], offset: int) -> CompletionLogprobs:
    """OpenAI's logprobs lists for (token, its log-probability) pairs, text offsets from `offset`.
    Each top dict holds the chosen token too; token strings are each token decoded alone."""
    tokens, values, tops, offsets = [], [], [], []
    for token, entry in entries:
        text = engine.decode([token])
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        values.append(None if entry is None else entry.logprob)
        tops.append(None if entry is None else
                    {**{engine.decode([t]): lp for t, lp in entry.top}, text: entry.logprob})
    return CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)


def _joined(a: CompletionLogprobs | None, b: CompletionLogprobs) -> CompletionLogprobs:
    if a is None:
        return b
    return CompletionLogprobs(tokens=a.tokens + b.tokens, token_logprobs=a.token_logprobs + b.token_logprobs,
                              top_logprobs=a.top_logprobs + b.top_logprobs, text_offset=a.text_offset + b.text_offset)


async def _nothing(choices: int):
    """The deltas of rows that generate nothing (max_tokens 0 with echo)."""
    yield [ChoiceDelta(i, "", "length", 0) for i in range(choices)]


async def _collect(deltas, echoes: list[_Echo], want_logprobs: bool, engine) -> list[tuple[CompletionChoice, int]]:
    choices = len(echoes)
    text, finish, tokens = [""] * choices, [None] * choices, [0] * choices
    entries: list[list] = [[] for _ in range(choices)]
    async for batch in deltas:
        for d in batch:
            text[d.index] += d.text
            tokens[d.index] = d.tokens
            entries[d.index] += [(e.token, e) for e in d.logprobs]
            if d.finish is not None:
                finish[d.index] = _openai_finish(d.finish)
    out = []
    for i, echo in enumerate(echoes):
        logprobs = _joined(echo.logprobs, _lists(engine, entries[i], echo.offset)) if want_logprobs else None
        out.append((CompletionChoice(text=echo.text + text[i], index=i, finish_reason=finish[i], logprobs=logprobs),
                    tokens[i]))
    return out


async def _chunks(deltas, reply: dict, echoes: list[_Echo], want_logprobs: bool, prompt_tokens: int,
                  include_usage: bool, runtime: Runtime, engine):
    """OpenAI's stream: a `text_completion` chunk per piece of a choice (with echo, the prompt
    first), the last with its finish_reason; with include_usage, a chunk with no choices and the
    usage; then [DONE]."""
    choices = len(echoes)
    tokens = [0] * choices
    offsets = [echo.offset for echo in echoes]
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, text: str, finish, logprobs) -> str:
        choice = {"text": text, "index": index, "logprobs": logprobs and logprobs.model_dump(), "finish_reason": finish}
        return sse_event({**reply, "object": "text_completion", "choices": [choice], **extra})

    try:
        echoed = [chunk(i, e.text, None, e.logprobs) for i, e in enumerate(echoes) if e.text]
        if echoed:
            yield "".join(echoed)
        async for batch in deltas:
            lines = []
            for d in batch:
                runtime.metrics.generated_tokens.inc(d.tokens - tokens[d.index])
                tokens[d.index] = d.tokens
                logprobs = None
                if want_logprobs:
                    logprobs = _lists(engine, [(e.token, e) for e in d.logprobs], offsets[d.index])
                    offsets[d.index] += sum(len(t) for t in logprobs.tokens)
                lines.append(chunk(d.index, d.text, _openai_finish(d.finish), logprobs))
            yield "".join(lines)
    except Exception as exc:  # the status has gone out: say so in the stream
        yield sse_event({"error": {"message": f"generation failed: {exc}", "type": "server_error", "param": None,
                               "code": None}})
    else:
        if include_usage:
            usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=sum(tokens),
                          total_tokens=prompt_tokens + sum(tokens))
            yield sse_event({**reply, "object": "text_completion", "choices": [], "usage": usage.model_dump()})
    yield "data: [DONE]\n\n"


def _openai_finish(reason: str | None) -> str | None:
    """OpenAI's finish_reason: "length" for max_tokens, "stop" for end-of-text or a stop string."""
    return None if reason is None else "length" if reason == "length" else "stop"
