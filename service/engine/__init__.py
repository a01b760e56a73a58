"""Generation engines: the backend-neutral interface and its TensorFlow implementation."""

from service.engine.base import Engine, GenerationRow, PromptTooLong

__all__ = ["Engine", "GenerationRow", "PromptTooLong"]
