"""OpenAI's completions and chat completions protocols as pydantic models, OpenAI's defaults in
the fields.

As vLLM's `entrypoints/openai/protocol.py`: the protocol here, the mapping onto the scheduler
in `service/v1/routes.py`. Unknown fields are ignored (clients send extras); a field this
server cannot honour is refused with a 400 naming it (`CompletionRequest.unsupported`,
`ChatCompletionRequest.unsupported`).
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

from service.schemas import MAX_SEED, integral


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: Optional[StrictBool] = False


class _SamplingRequest(BaseModel):
    """The fields /v1/completions and /v1/chat/completions share: the model, sampling, stop
    strings, streaming, and the penalties and bias this server refuses unless off."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    temperature: Optional[float] = Field(1.0, ge=0, allow_inf_nan=False)
    top_p: Optional[float] = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    n: Optional[StrictInt] = Field(1, ge=1)
    stream: Optional[StrictBool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    seed: Optional[StrictInt] = Field(None, ge=0, le=MAX_SEED, description="0 to 2^53-1, the largest integer "
                                      "every JSON client holds exactly.")
    user: Optional[StrictStr] = None
    presence_penalty: Optional[float] = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: Optional[float] = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: Optional[dict[str, float]] = None
    # Extensions (vLLM's names): not in OpenAI's API, ignored by its servers.
    top_k: Optional[StrictInt] = Field(None, ge=-1, description="Sample from the k likeliest tokens; 0, -1 or null: off.")
    repetition_penalty: Optional[float] = Field(None, gt=0, le=10, allow_inf_nan=False,
                                                description="transformers' repetition penalty; 1 or null: off.")

    _integers = field_validator("n", "seed", "top_k", mode="before")(classmethod(lambda cls, value: integral(value)))

    @property
    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions. Limits that depend on the settings are checked by the route."""

    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]] = Field(
        description="A string, a list of strings, a list of token ids, or a list of lists of token ids.")
    max_tokens: Optional[StrictInt] = Field(16, ge=0, description="New tokens per choice; null means 16.")
    logprobs: Optional[StrictInt] = Field(None, ge=0, le=5)
    echo: Optional[StrictBool] = False
    best_of: Optional[StrictInt] = None
    suffix: Optional[StrictStr] = None

    _own_integers = field_validator("prompt", "max_tokens", "logprobs", "best_of", mode="before")(
        classmethod(lambda cls, value: integral(value)))

    def unsupported(self) -> tuple[str, str] | None:
        """(field, why) for the first field set to something this server does not do yet."""
        checks = [
            ("presence_penalty", self.presence_penalty not in (None, 0.0), "presence_penalty is not supported"),
            ("frequency_penalty", self.frequency_penalty not in (None, 0.0), "frequency_penalty is not supported"),
            ("best_of", self.best_of not in (None, 1), "best_of other than 1 is not supported"),
            ("logit_bias", bool(self.logit_bias), "logit_bias is not supported; only {} is accepted"),
            ("suffix", self.suffix is not None, "suffix is not supported (GPT-2 does not fill in the middle)"),
        ]
        return next(((field, why) for field, refused, why in checks if refused), None)


class ChatMessage(BaseModel):
    """One message of a conversation. `content` is a string or a list of parts, of which this
    server takes `{"type": "text", "text": ...}` (others are refused by the route, naming them)."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: Optional[Union[StrictStr, list[dict[str, Any]]]] = None
    name: Optional[StrictStr] = None
    tool_calls: Optional[list[Any]] = None
    function_call: Optional[Any] = None


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions. Limits that depend on the settings are checked by the route."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[StrictInt] = Field(None, ge=1, description="New tokens per choice (deprecated by OpenAI for "
                                            "max_completion_tokens, which wins when both are set). Null: the rest of "
                                            "the context window, within MAX_TOKENS_LIMIT and MAX_TOTAL_TOKENS.")
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1, description="New tokens per choice.")
    logprobs: Optional[StrictBool] = False
    top_logprobs: Optional[StrictInt] = Field(None, ge=0, le=5, description="0 to 5, with logprobs true.")
    # What this server cannot do: refused when set to anything but "off" (`unsupported`).
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    functions: Optional[list[Any]] = None
    function_call: Optional[Any] = None
    response_format: Optional[dict[str, Any]] = None
    audio: Optional[Any] = None
    modalities: Optional[list[Any]] = None

    _own_integers = field_validator("max_tokens", "max_completion_tokens", "top_logprobs", mode="before")(
        classmethod(lambda cls, value: integral(value)))

    def unsupported(self) -> tuple[str, str] | None:
        """(field, why) for the first field set to something this server does not do."""
        checks = [
            ("tools", bool(self.tools), "tools are not supported (this server does not call functions)"),
            ("tool_choice", self.tool_choice not in (None, "none"), "tool_choice other than \"none\" is not supported"),
            ("functions", bool(self.functions), "functions are not supported (this server does not call functions)"),
            ("function_call", self.function_call not in (None, "none"),
             "function_call other than \"none\" is not supported"),
            ("response_format", self.response_format not in (None, {"type": "text"}),
             "response_format other than {\"type\": \"text\"} is not supported"),
            ("audio", self.audio is not None, "audio output is not supported"),
            ("modalities", self.modalities not in (None, ["text"]), "modalities other than [\"text\"] are not supported"),
            ("presence_penalty", self.presence_penalty not in (None, 0.0), "presence_penalty is not supported"),
            ("frequency_penalty", self.frequency_penalty not in (None, 0.0), "frequency_penalty is not supported"),
            ("logit_bias", bool(self.logit_bias), "logit_bias is not supported; only {} is accepted"),
            ("top_logprobs", self.top_logprobs is not None and not self.logprobs,
             "top_logprobs needs logprobs set to true"),
        ]
        return next(((field, why) for field, refused, why in checks if refused), None)


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatTokenLogprobs(ChatTokenLogprob):
    top_logprobs: list[ChatTokenLogprob]


class ChatLogprobs(BaseModel):
    content: Optional[list[ChatTokenLogprobs]] = None
    refusal: Optional[list[ChatTokenLogprobs]] = None


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: Optional[str] = None


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[Literal["stop", "length"]] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    """One entry per token: the prompt's first has no log-probability (null) and no top dict."""

    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[Literal["stop", "length"]] = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "local"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorBody
