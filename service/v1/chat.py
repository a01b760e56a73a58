"""POST /v1/chat/completions: OpenAI's chat protocol over the model's own chat template.

The messages are rendered by the model directory's template as transformers renders them
(service/chat_template.py), the text is encoded without added special tokens (the template
writes them), and the prompt then runs as a /v1/completions prompt does (service/v1/generation.py):
same checks, rows, scheduler, stop strings and streaming. A model without a template (a base
model such as DistilGPT2) answers 400: there is no right way to turn messages into its prompt.
"""

import time
import uuid

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from service.config import Settings
from service.errors import OpenAIError
from service.routes import RuntimeDep
from service.schemas import event_stream
from service.streaming import ChoiceDelta, unless_disconnected
from service.v1 import generation
from service.v1.generation import ERRORS, Sampling
from service.v1.protocol import (ChatCompletionChoice, ChatCompletionMessage, ChatCompletionRequest,
                                 ChatCompletionResponse, ChatLogprobs, ChatMessage, ChatTokenLogprob,
                                 ChatTokenLogprobs)


def add_chat_route(router: APIRouter, settings: Settings) -> None:
    @router.post("/chat/completions", response_model=ChatCompletionResponse,
                 responses={200: {"content": event_stream("A `chat.completion.chunk` as JSON (choices and, with "
                                                          "include_usage, usage), an `error` object, or `[DONE]`"),
                                  "description": "The chat completion; with `stream`, OpenAI's chunks as server-sent "
                                                 "events"},
                            **ERRORS})
    async def chat_completions(body: ChatCompletionRequest, runtime: RuntimeDep, http: Request):
        """OpenAI's chat completions, with the model's chat template: docs/api.md's table says what
        each field does here."""
        engine, scheduler = runtime.ready_engine()
        generation.check_model(body.model, settings)
        refused = body.unsupported()
        if refused:
            raise OpenAIError(400, refused[1], param=refused[0], code="unsupported_parameter")
        if runtime.chat_template is None:
            raise OpenAIError(400, "this model has no chat template (no chat_template in its tokenizer_config.json "
                              "and no chat_template.jinja), so messages cannot be turned into its prompt; use "
                              "/v1/completions with a prompt", param="messages", code="no_chat_template")
        conversation = [_message(i, m) for i, m in enumerate(body.messages)]
        # The template writes the special tokens itself (as apply_chat_template, no second <s>).
        ids = engine.encode(runtime.chat_template.render(conversation), special_tokens=False)  # ChatTemplateError: a 400
        n = body.n or 1
        tokens_param, max_tokens = _max_tokens(body)
        if max_tokens is None:  # OpenAI's is unbounded: the rest of the window, within the limits
            if len(ids) >= engine.context_window:
                raise generation.context_exceeded(engine, len(ids), 1, "messages")
            max_tokens = min(engine.context_window - len(ids), settings.max_tokens_limit,
                             max(1, settings.max_total_tokens // n))
            # and what the memory budget holds for the conversation alone (if not even a token
            # fits, check_fits says so below)
            max_tokens = max(1, engine.most_tokens_within_budget(ids, max_tokens))
        sampling = Sampling.of(body, (body.top_logprobs or 0) if body.logprobs else None)
        generation.check_limits(settings, n, max_tokens, sampling.temperature, body.stops, rows_name="n",
                                tokens_param=tokens_param)
        generation.check_fits(engine, [ids], max_tokens, param="messages", tokens_param=tokens_param)
        rows = generation.rows_for([ids], n, max_tokens, sampling)
        reply = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": settings.model_name}
        request, deltas = generation.submit(runtime, scheduler, engine, rows, stream=bool(body.stream),
                                            stops=body.stops)
        generation.count_prompt(runtime, len(ids))  # accepted: a full queue has raised by now
        want_logprobs = bool(body.logprobs)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_chunks(deltas, reply, n, want_logprobs, len(ids), include_usage, runtime,
                                             engine),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        outputs = await unless_disconnected(generation.collect(deltas, n), request, http)
        if outputs is None:  # the client is gone: nobody reads this
            return Response(status_code=499)
        completion_tokens = sum(c.tokens for c in outputs)
        runtime.metrics.generated_tokens.inc(completion_tokens)
        choices = [ChatCompletionChoice(index=i, message=ChatCompletionMessage(content=c.text), finish_reason=c.finish,
                                        logprobs=ChatLogprobs(content=_logprobs(engine, c.logprobs))
                                        if want_logprobs else None)
                   for i, c in enumerate(outputs)]
        return ChatCompletionResponse(**reply, choices=choices, usage=generation.usage(len(ids), completion_tokens))


def _max_tokens(body: ChatCompletionRequest) -> tuple[str, int | None]:
    """The field the new tokens were asked in and their number (None: not asked);
    max_completion_tokens wins over the deprecated max_tokens."""
    if body.max_completion_tokens is not None:
        return "max_completion_tokens", body.max_completion_tokens
    return "max_tokens", body.max_tokens


def _message(index: int, message: ChatMessage) -> dict:
    """The message as the template sees it: its role, its content as one string (text parts
    joined with newlines, as vLLM does for templates that take a string), its name if given."""
    where = f"messages[{index}]"
    if message.tool_calls or message.function_call:
        raise OpenAIError(400, f"{where}: tool and function calls are not supported", param="messages",
                          code="unsupported_parameter")
    content = message.content
    if content is None:
        raise OpenAIError(400, f"{where}: content is missing", param="messages")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type")
            if kind != "text":
                raise OpenAIError(400, f"{where}.content[{j}]: content parts of type {kind!r} are not supported; "
                                  "only 'text' parts are", param="messages", code="unsupported_content_part")
            if not isinstance(part.get("text"), str):
                raise OpenAIError(400, f"{where}.content[{j}]: a text part needs a string 'text'", param="messages")
            texts.append(part["text"])
        content = "\n".join(texts)
    rendered = {"role": message.role, "content": content}
    if message.name is not None:
        rendered["name"] = message.name
    return rendered


def _logprobs(engine, entries) -> list[ChatTokenLogprobs]:
    """OpenAI's chat log-probabilities of TokenLogprobs: each token decoded alone, its UTF-8
    bytes (a token ending inside a character decodes to U+FFFD, whose bytes these are, as in
    vLLM), and the likeliest tokens' (the chosen token only where it is one of them)."""

    def token(token_id: int, logprob: float) -> dict:
        text = engine.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return [ChatTokenLogprobs(**token(e.token, e.logprob), top_logprobs=[ChatTokenLogprob(**token(t, lp))
                                                                         for t, lp in e.top])
            for e in entries]


def _chunks(deltas, reply: dict, n: int, want_logprobs: bool, prompt_tokens: int, include_usage: bool, runtime,
            engine):
    """OpenAI's `chat.completion.chunk` stream: each choice's first delta is the role with empty
    content, then its content as it comes, then an empty delta with its finish_reason."""

    def choice(index: int, delta: dict, logprobs=None, finish=None) -> dict:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    def pieces(d: ChoiceDelta) -> list[dict]:
        out = []
        logprobs = ({"content": [e.model_dump() for e in _logprobs(engine, d.logprobs)], "refusal": None}
                    if want_logprobs and d.logprobs else None)
        if d.text or logprobs:
            out.append(choice(d.index, {"content": d.text}, logprobs))
        if d.finish is not None:
            out.append(choice(d.index, {}, finish=generation.openai_finish(d.finish)))
        return out

    first = [choice(i, {"role": "assistant", "content": ""}) for i in range(n)]
    return generation.chunk_stream(deltas, pieces, {**reply, "object": "chat.completion.chunk"}, prompt_tokens,
                                   include_usage, runtime, first=first)
