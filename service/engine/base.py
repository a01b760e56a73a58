"""The interface between the HTTP layer and a generation backend.

As in vLLM's `engine/protocol.py`, the server talks to the engine only through this small
surface, so that a LiteRT backend can stand beside the TensorFlow one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["eos_token", "length"]


@dataclass(frozen=True)
class GenerationRow:
    """One prompt's work: its tokens and its own sampling parameters.

    Each decode step turns the model's logits for the row into its next token, as transformers'
    `generate` does, in this order:
    1. `repetition_penalty` (1.0 is off): transformers' `RepetitionPenaltyLogitsProcessor` over
       the prompt's and the row's generated tokens (a positive logit is divided by it, a
       negative one multiplied);
    2. `temperature == 0` is greedy: the largest logit. Otherwise logits / temperature, then
    3. `top_k` (0 is off): only the k largest logits stay (ties with the k-th stay too),
    4. `top_p` (1.0 is off): only the smallest set of most likely tokens whose probabilities sum
       to at least top_p stays (transformers' `TopPLogitsWarper`; at least one token stays),
    5. a draw from the softmax of what is left. A sampled row draws its random numbers from the
       stream `(seed, stream)` indexed by the token's position, so its output does not depend on
       which other rows share its batch.

    `logprobs` (None is off; 0 to 5): report, for each generated token (end-of-text included),
    its log-probability under log-softmax of the model's raw logits (before any of the above),
    with the `logprobs` most likely tokens and theirs.
    """

    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float = 0.0
    seed: int = 0
    stream: int = 0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None

    @property
    def plain(self) -> bool:
        """No sampling control beyond temperature, and no log-probabilities."""
        return self.top_k == 0 and self.top_p == 1.0 and self.repetition_penalty == 1.0 and self.logprobs is None


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability, and the `top` most likely tokens' (most likely first)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class RowUpdate:
    """What one decode call produced for one row: its new tokens (end-of-text excluded), and why
    it stopped if it did ("eos_token": it generated end-of-text; "length": it reached max_tokens).

    With the row's `logprobs` set, `logprobs` has one entry per new token and, when the row
    ended on end-of-text, one more for that token."""

    key: Hashable
    tokens: list[int]
    finish: FinishReason | None = None
    logprobs: list[TokenLogprob] | None = None
    error: Exception | None = None  # the row's own failure (its sampling): it alone ends, and leaves


class DecodeBatch(ABC):
    """The rows being decoded together and their key/value cache: TGI's `Batch`, as a value that
    the scheduler drives between decode calls (service/scheduler.py).

    Contract (one thread at a time calls it):
    - `extend(entries)` prefills rows `(key, GenerationRow)` into the batch; they take part from the
      next `step`. Keys are the caller's and unique within the batch.
    - `step()` runs one decode call and returns one `RowUpdate` per row that took part in it (every
      row, unless the backend gives some rows calls of their own), in the batch's order: one or
      more new tokens each (a backend may run several steps per call), and a finish reason for
      the rows that ended. A row whose own work failed (its sampling) gets an update with its
      `error` and no tokens. Finished and failed rows must be filtered out before the next `step`.
    - `filter(keys)` keeps only the rows with these keys (finished or cancelled rows leave).
    - A row's tokens are the same whatever shares the batch, or joins or leaves it, and whenever
      it joins: greedy rows decode as the model does on their prompt alone, and sampled rows draw
      from their own (seed, stream) stream indexed by the token's position in the row.
    """

    @property
    @abstractmethod
    def keys(self) -> list[Hashable]: ...

    def __len__(self) -> int:
        return len(self.keys)

    @abstractmethod
    def extend(self, entries: Sequence[tuple[Hashable, GenerationRow]]) -> None: ...

    @abstractmethod
    def step(self) -> list[RowUpdate]: ...

    @abstractmethod
    def filter(self, keys: Sequence[Hashable]) -> None: ...

    def advance(self) -> list[RowUpdate]:
        """One decode call, after which the rows that finished leave; returns its updates."""
        updates = self.step()
        finished = {u.key for u in updates if u.finish is not None or u.error is not None}
        if finished:
            self.filter([key for key in self.keys if key not in finished])
        return updates


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


class OverMemoryBudget(ValueError):
    """A row that could never run: a batch holding it alone would pass the memory budget."""

    def __init__(self, index: int, prompt_tokens: int, max_tokens: int, need: int, budget: int):
        self.index, self.need, self.budget = index, need, budget
        super().__init__(
            f"prompt {index} has {prompt_tokens} tokens; with max_tokens={max_tokens} its key/value memory "
            f"could reach {need / 2**20:.1f} MiB, more than this server's budget of {budget / 2**20:.1f} MiB "
            f"for generation (its memory limit less what the model takes); ask for fewer tokens"
        )


class Engine(ABC):
    """Turns rows into token ids, through batches the scheduler extends and filters per call.

    Contract: `encode` and `check_fits` are cheap and may be called from the event loop;
    `warmup` compiles every shape a batch of up to `max_batch_size` rows can meet, so no call
    after it compiles; `new_batch` and the batches it makes are used from one worker thread at a
    time. `generate` runs rows to their end in one batch and returns, for each row in order, the
    new token ids without the end-of-text token.
    """

    context_window: int
    vocab_size: int  # token ids are 0 .. vocab_size - 1
    max_batch_size: int  # most rows a batch holds (the scheduler never extends past it)
    backend: str = "unknown"  # "litert" or "tf": reported by /health and /metrics
    precision: str = "fp32"
    lane_rows: int = 0  # rows that got decode calls of their own (LiteRT's short lane), and those calls
    lane_calls: int = 0
    # Memory the engine gave back after warm-up that a prompt's prefill takes again while it
    # runs: the memory budget counts it as resident (service/runtime.py).
    prompt_reserve_bytes: int = 0
    eos_id: int  # the end-of-sequence token, where one token is wanted (padding, an empty prompt)
    eos_ids: frozenset[int]  # a row ends on any of these (`eos_id` among them)
    # The tokenizer's byte-fallback pieces (SentencePiece's `<0xE6>`), whose text may change with
    # the next token: IncrementalDetokenizer holds text back after one.
    byte_fallback_ids: frozenset[int] = frozenset()

    @abstractmethod
    def encode(self, text: str, special_tokens: bool = True) -> list[int]:
        """Token ids of a prompt; an empty prompt is the start-of-text token alone.

        `special_tokens`: add the tokens the tokenizer adds to a text of its own (Llama 2's and
        TinyLlama's `<s>`; GPT-2, SmolLM2 and Qwen2 add none), as transformers' `tokenizer(text)`
        does; False for a text that already holds them (a rendered chat template)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    @abstractmethod
    def warmup(self) -> None: ...

    @abstractmethod
    def new_batch(self) -> DecodeBatch:
        """An empty batch: rows enter it through `extend`."""

    def generate(self, rows: Sequence[GenerationRow]) -> list[list[int]]:
        """Every row to its end, up to `max_batch_size` at a time (a row joins as one leaves)."""
        outputs: list[list[int]] = [[] for _ in rows]
        waiting = list(enumerate(rows))[::-1]
        batch = self.new_batch()
        while True:
            room = self.max_batch_size - len(batch)
            batch.extend([waiting.pop() for _ in range(min(room, len(waiting)))])
            if not len(batch):
                return outputs
            for update in batch.advance():
                outputs[update.key] += update.tokens

    def prompt_logprobs(self, prompt_ids: Sequence[int], top: int) -> list[TokenLogprob | None]:
        """Each prompt token's log-probability given the tokens before it (log-softmax of the
        model's logits), with the `top` most likely tokens'; None for the first, which has no
        context."""
        raise NotImplementedError(f"the {self.backend} backend does not compute prompt log-probabilities")

    def compiles_after_warmup(self) -> int:
        """How many programs were compiled after warm-up ended (the goal is 0)."""
        return 0

    def check_fits(self, index: int, prompt_ids: Sequence[int], max_tokens: int) -> None:
        """Raise `PromptTooLong` when the prompt and `max_tokens` pass the context window, and
        `OverMemoryBudget` when a batch holding this row alone would pass `memory_budget`."""
        if len(prompt_ids) + max_tokens > self.context_window:
            raise PromptTooLong(index, len(prompt_ids), max_tokens, self.context_window)
        if self.memory_budget is not None:
            need = self.batch_bytes([GenerationRow(tuple(prompt_ids), max_tokens)])
            if need > self.memory_budget:
                raise OverMemoryBudget(index, len(prompt_ids), max_tokens, need, self.memory_budget)

    def most_tokens_within_budget(self, prompt_ids: Sequence[int], up_to: int) -> int:
        """The largest max_tokens (at most `up_to`) for which a batch holding this row alone
        stays within `memory_budget`; `up_to` when there is no budget, 0 when not even one fits."""
        if self.memory_budget is None:
            return up_to
        low, high = 0, up_to  # batch_bytes never falls as max_tokens grows: the last that fits
        while low < high:
            middle = (low + high + 1) // 2
            if self.batch_bytes([GenerationRow(tuple(prompt_ids), middle)]) <= self.memory_budget:
                low = middle
            else:
                high = middle - 1
        return low

    # --- memory: what admission reads (service/scheduler.py) -------------------------------

    # Bytes the batches' key/value memory may take, set once after warm-up from the measured
    # memory left under the process's limit (service/memory.py); None: no bound.
    memory_budget: int | None = None

    def set_memory_budget(self, budget: int | None) -> None:
        """Bound the key/value memory of every batch to `budget` bytes from now on (None: no
        bound). The scheduler admits a row only while `batch_bytes` of the batch with it stays
        within the budget; a backend whose pool grows by a rule caps its largest pool here."""
        self.memory_budget = budget

    def batch_bytes(self, rows: Sequence[GenerationRow]) -> int:
        """The most memory (bytes, beyond what warm-up measured) a batch holding these rows can
        reach, whatever order they finish in: their key/value slots at full length (prompt +
        max_tokens), the backend's growth rule and the transient copies it makes. 0: unknown."""
        return 0

    def kv_slots_used(self) -> int:
        """Key/value slots the running batch fills now (0 when idle)."""
        return 0

    def kv_bytes_reserved(self) -> int:
        """Bytes the running batch's key/value memory holds now (its pool; 0 when idle)."""
        return 0
