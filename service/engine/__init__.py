"""Generation engines: the backend-neutral interface, and its LiteRT and TensorFlow implementations."""

from service.engine.base import (DecodeBatch, Engine, FinishReason, GenerationRow, OverMemoryBudget, PromptTooLong, RowUpdate,
                                 TokenLogprob)

__all__ = ["DecodeBatch", "Engine", "FinishReason", "GenerationRow", "OverMemoryBudget", "PromptTooLong", "RowUpdate", "TokenLogprob"]
