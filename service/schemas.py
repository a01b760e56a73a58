"""Request and response bodies of the HTTP API.

The request model is built from the settings, so its limits are enforced by validation (422 in
FastAPI's usual shape) and shown in the OpenAPI schema at /docs.
"""

from __future__ import annotations

from typing import Annotated, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

from service.config import Settings

# The largest integer every JSON client holds exactly (JavaScript's Number.MAX_SAFE_INTEGER, a
# float64's 53-bit mantissa): a larger seed would change in transit in many clients. The engine
# takes any 64-bit seed.
MAX_SEED = 2**53 - 1



def integral(value):
    """A JSON number with no fractional part as an int, in lists too: JSON has one kind of number,
    and to JSON Schema (and JavaScript) 2.0 is the integer 2. Strings and 2.5 stay as they are,
    for the strict integer fields to refuse. (A model's `field_validator(mode="before")`: an
    annotated validator would lose the fields' bounds in the JSON schema.)"""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [integral(v) for v in value]
    return value


def event_stream(payload: str) -> dict:
    """The OpenAPI content of a server-sent event stream: the schema of one event, whose `data`
    is a JSON text (or the end marker)."""
    return {"text/event-stream": {"schema": {
        "type": "object", "required": ["data"],
        "properties": {"data": {"type": "string", "contentMediaType": "application/json", "description": payload},
                       "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}}}}}


STREAM_DESCRIPTION = (
    "Each event is a `data:` line with a JSON object: `{\"index\": i, \"text\": piece}` for new text of "
    "prompt i (pieces never split a UTF-8 character); then, per prompt, `{\"index\": i, \"text\": \"\", "
    "\"finish_reason\": \"eos_token\" | \"length\" | \"stop_sequence\", \"prompt_tokens\": n, \"generated_tokens\": m}`; "
    "then `data: [DONE]`. If generation fails mid-stream, `{\"error\": message}` comes before `[DONE]`."
)


class GenerateResponse(BaseModel):
    results: list[str] = Field(description="One continuation per prompt, in the prompts' order; new text only.")

    model_config = ConfigDict(json_schema_extra={"examples": [{"results": [" jumps over the lazy dog."]}]})


class ErrorMessage(BaseModel):
    """The body of every error of /generate, /health and /metrics but validation's (422)."""

    detail: str = Field(description="What is wrong.")

    model_config = ConfigDict(json_schema_extra={"examples": [{"detail": "Incorrect API key provided."}]})


class HealthResponse(BaseModel):
    status: str = Field(description='"ok" when ready; "loading" during warm-up; "failed" if warm-up failed.')
    backend: Optional[str] = Field(None, description='What serves: "litert" (TensorFlow Lite) or "tf" (TensorFlow with XLA).')
    precision: Optional[str] = Field(None, description='The weights served: "int8" or "fp32".')

    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ok", "backend": "litert", "precision": "int8"}]})


def generate_request_model(settings: Settings) -> type[BaseModel]:
    """The body of POST /generate, with the limits of these settings."""
    default_max_tokens = min(128, settings.max_tokens_limit)

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(
            extra="forbid",
            json_schema_extra={
                "examples": [
                    {"prompts": "The quick brown fox", "max_tokens": 16, "temperature": 0},
                    {"prompts": ["Once upon a time", "def fib(n):"], "max_tokens": 32,
                     "temperature": 0.8, "seed": 42},
                ]
            },
        )

        prompts: Union[
            StrictStr,
            Annotated[list[StrictStr], Field(min_length=1, max_length=settings.max_prompts_per_request)],
        ] = Field(description="A prompt, or a list of up to "
                  f"{settings.max_prompts_per_request} prompts. An empty prompt starts from the start-of-text token.")
        max_tokens: StrictInt = Field(
            default_max_tokens, ge=1, le=settings.max_tokens_limit,
            description="Most new tokens per prompt; a row also stops at end-of-text.")
        temperature: Annotated[float, Field(strict=True)] = Field(
            1.0, ge=0, le=settings.max_temperature, allow_inf_nan=False,
            description="0 is greedy (deterministic); above 0 samples from softmax(logits / temperature).")
        seed: Optional[StrictInt] = Field(
            None, ge=0, le=MAX_SEED,
            description="Makes sampling reproducible: prompt i of the request draws from the stream (seed, i). "
            "At most 2^53-1, the largest integer every JSON client holds exactly.")
        top_k: StrictInt = Field(0, ge=0, description="Sample only from the k likeliest tokens (0: off).")
        top_p: Annotated[float, Field(strict=True)] = Field(
            1.0, gt=0, le=1, allow_inf_nan=False,
            description="Sample only from the smallest set of likeliest tokens whose probabilities reach top_p (1: off).")
        repetition_penalty: Annotated[float, Field(strict=True)] = Field(
            1.0, gt=0, le=10, allow_inf_nan=False,
            description="transformers' repetition penalty over the prompt and the new tokens (1: off); greedy rows too.")
        stop: Optional[Union[Annotated[StrictStr, Field(min_length=1)],
                             Annotated[list[Annotated[StrictStr, Field(min_length=1)]], Field(min_length=1, max_length=16)]]] = Field(
            None, description="Up to 16 strings: a prompt's text ends before the first of them to appear (matched on "
            "the text, across token boundaries), and it stops generating there.")
        stream: StrictBool = Field(
            False, description="Answer with server-sent events (text/event-stream) as text is made, instead "
            "of one JSON body at the end. " + STREAM_DESCRIPTION)

        _integers = field_validator("max_tokens", "seed", "top_k", mode="before")(
            classmethod(lambda cls, value: integral(value)))

    return GenerateRequest
