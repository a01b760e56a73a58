"""OpenAI's legacy completions protocol as pydantic models, OpenAI's defaults in the fields.

As vLLM's `entrypoints/openai/protocol.py`: the protocol here, the mapping onto the scheduler
in `service/v1/routes.py`. Unknown fields are ignored (clients send extras); a field this
server cannot honour is refused with a 400 naming it (`CompletionRequest.unsupported`).
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

from service.schemas import MAX_SEED, integral


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: Optional[StrictBool] = False


class CompletionRequest(BaseModel):
    """POST /v1/completions. Limits that depend on the settings are checked by the route."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]] = Field(
        description="A string, a list of strings, a list of token ids, or a list of lists of token ids.")
    max_tokens: Optional[StrictInt] = Field(16, ge=0, description="New tokens per choice; null means 16.")
    temperature: Optional[float] = Field(1.0, ge=0, allow_inf_nan=False)
    top_p: Optional[float] = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    n: Optional[StrictInt] = Field(1, ge=1)
    stream: Optional[StrictBool] = False
    stream_options: Optional[StreamOptions] = None
    logprobs: Optional[StrictInt] = Field(None, ge=0, le=5)
    echo: Optional[StrictBool] = False
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    presence_penalty: Optional[float] = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: Optional[float] = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    best_of: Optional[StrictInt] = None
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[StrictStr] = None
    seed: Optional[StrictInt] = Field(None, ge=0, le=MAX_SEED, description="0 to 2^53-1, the largest integer "
                                      "every JSON client holds exactly.")
    suffix: Optional[StrictStr] = None
    # Extensions (vLLM's names): not in OpenAI's API, ignored by its servers.
    top_k: Optional[StrictInt] = Field(None, ge=-1, description="Sample from the k likeliest tokens; 0, -1 or null: off.")
    repetition_penalty: Optional[float] = Field(None, gt=0, le=10, allow_inf_nan=False,
                                                description="transformers' repetition penalty; 1 or null: off.")

    _integers = field_validator("prompt", "max_tokens", "n", "logprobs", "best_of", "seed", "top_k", mode="before")(
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

    @property
    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


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
