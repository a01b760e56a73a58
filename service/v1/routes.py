"""The OpenAI-compatible front door: /v1/models, /v1/completions and /v1/chat/completions
(service/v1/chat.py) onto the same scheduler as POST /generate (one batch may mix them). What
the two generation routes share is in service/v1/generation.py; errors are answered in
OpenAI's envelope (service/errors.py)."""

import time
import uuid
from dataclasses import dataclass

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from service.config import Settings
from service.engine import TokenLogprob
from service.errors import OpenAIError
from service.routes import KeyDocs, RuntimeDep
from service.schemas import event_stream
from service.streaming import ChoiceDelta, unless_disconnected
from service.v1 import generation
from service.v1.chat import add_chat_route
from service.v1.generation import ERRORS, Sampling
from service.v1.protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse,
                                 ErrorResponse, ModelCard, ModelList)


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
        generation.check_model(body.model, settings)
        refused = body.unsupported()
        if refused:
            raise OpenAIError(400, refused[1], param=refused[0], code="unsupported_parameter")
        prompts = _prompt_ids(body.prompt, engine)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        n = body.n or 1
        sampling = Sampling.of(body, body.logprobs)
        if max_tokens < 1 and not body.echo:
            raise OpenAIError(400, "max_tokens must be at least 1 (0 only with echo)", param="max_tokens")
        generation.check_limits(settings, len(prompts) * n, max_tokens, sampling.temperature, body.stops)
        if isinstance(body.prompt, str) or (body.prompt and isinstance(body.prompt[0], str)):
            prompt_texts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        else:
            prompt_texts = [engine.decode(ids) for ids in prompts]
        generation.check_fits(engine, prompts, max_tokens)
        rows = generation.rows_for(prompts, n, max_tokens, sampling)
        echoes = [_Echo(prompt_texts[i // n] if body.echo else "", len(prompt_texts[i // n]), None)
                  for i in range(len(rows))]
        if body.echo and body.logprobs is not None:
            scored = [await _prompt_logprobs(engine, scheduler, ids, body.logprobs) for ids in prompts]
            echoes = [_Echo(e.text, e.offset, _lists(engine, scored[i // n], 0)) for i, e in enumerate(echoes)]
        reply = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": settings.model_name}
        prompt_tokens = sum(len(ids) for ids in prompts)
        if max_tokens == 0:  # echo alone: the prompts scored, nothing generated
            request, deltas = None, _nothing(len(rows))
        else:
            request, deltas = generation.submit(runtime, scheduler, engine, rows, stream=bool(body.stream),
                                                stops=body.stops)
        generation.count_prompt(runtime, prompt_tokens)  # accepted: a full queue has raised by now
        want_logprobs = body.logprobs is not None
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_chunks(deltas, reply, echoes, want_logprobs, prompt_tokens, include_usage,
                                             runtime, engine),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        collected = generation.collect(deltas, len(rows))
        outputs = await (collected if request is None else unless_disconnected(collected, request, http))
        if outputs is None:  # the client is gone: nobody reads this
            return Response(status_code=499)
        completion_tokens = sum(c.tokens for c in outputs)
        runtime.metrics.generated_tokens.inc(completion_tokens)
        choices = [CompletionChoice(text=echo.text + c.text, index=i, finish_reason=c.finish,
                                    logprobs=_joined(echo.logprobs, _lists(engine, [(e.token, e) for e in c.logprobs],
                                                                           echo.offset)) if want_logprobs else None)
                   for i, (echo, c) in enumerate(zip(echoes, outputs))]
        return CompletionResponse(**reply, choices=choices, usage=generation.usage(prompt_tokens, completion_tokens))

    add_chat_route(router, settings)
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


def _chunks(deltas, reply: dict, echoes: list[_Echo], want_logprobs: bool, prompt_tokens: int,
            include_usage: bool, runtime, engine):
    """OpenAI's stream of `text_completion` chunks: a chunk per piece of a choice (with echo,
    the prompt first), the last with its finish_reason (generation.chunk_stream does the rest)."""
    offsets = [echo.offset for echo in echoes]

    def choice(index: int, text: str, finish, logprobs) -> dict:
        return {"text": text, "index": index, "logprobs": logprobs and logprobs.model_dump(), "finish_reason": finish}

    def pieces(d: ChoiceDelta) -> list[dict]:
        logprobs = None
        if want_logprobs:
            logprobs = _lists(engine, [(e.token, e) for e in d.logprobs], offsets[d.index])
            offsets[d.index] += sum(len(t) for t in logprobs.tokens)
        return [choice(d.index, d.text, generation.openai_finish(d.finish), logprobs)]

    echoed = [choice(i, e.text, None, e.logprobs) for i, e in enumerate(echoes) if e.text]
    return generation.chunk_stream(deltas, pieces, {**reply, "object": "text_completion"}, prompt_tokens,
                                   include_usage, runtime, first=echoed)
