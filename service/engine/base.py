"""The interface between the HTTP layer and a generation backend.

As in vLLM's `engine/protocol.py`, the server talks to the engine only through this small
surface, so that a LiteRT backend can stand beside the TensorFlow one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class GenerationRow:
    """One prompt's work: its tokens and its own sampling parameters.

    `temperature == 0` is greedy decoding. A sampled row draws its random numbers from the
    stream `(seed, stream)` indexed by the token's position, so its output does not depend on
    which other rows share its batch.
    """

    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float = 0.0
    seed: int = 0
    stream: int = 0


class PromptTooLong(ValueError):
    """A prompt's tokens plus `max_tokens` exceed the model's context window."""

    def __init__(self, index: int, prompt_tokens: int, max_tokens: int, context_window: int):
        self.index = index
        self.excess = prompt_tokens + max_tokens - context_window
        super().__init__(
            f"prompt {index} has {prompt_tokens} tokens; with max_tokens={max_tokens} that is "
            f"{prompt_tokens + max_tokens}, {self.excess} more than the model's context window "
            f"of {context_window} tokens"
        )


class Engine(ABC):
    """Turns batches of rows into token ids.

    Contract: `encode` and `check_fits` are cheap and may be called from the event loop;
    `warmup` compiles every shape `generate` can meet, so no call after it compiles;
    `generate` is called from one worker thread at a time and returns, for each row in order,
    the new token ids without the end-of-text token.
    """

    context_window: int
    backend: str = "unknown"  # "litert" or "tf": reported by /health and /metrics
    precision: str = "fp32"

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt; an empty prompt is the start-of-text token alone."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    @abstractmethod
    def warmup(self) -> None: ...

    @abstractmethod
    def generate(self, rows: Sequence[GenerationRow]) -> list[list[int]]: ...

    def compiles_after_warmup(self) -> int:
        """How many programs were compiled after warm-up ended (the goal is 0)."""
        return 0

    def check_fits(self, index: int, prompt_ids: Sequence[int], max_tokens: int) -> None:
        if len(prompt_ids) + max_tokens > self.context_window:
            raise PromptTooLong(index, len(prompt_ids), max_tokens, self.context_window)
