"""A stand-in engine for HTTP behaviour that does not depend on the model."""

import threading

from service.engine import Engine


class FakeEngine(Engine):
    """Characters as tokens; each row's output is its prompt reversed, cut to max_tokens.

    `warmup` and `generate` can be held at a gate, to observe the server while they run.
    """

    context_window = 64
    backend = "fake"

    def __init__(self, fail_with: Exception | None = None):
        self.warmup_gate = threading.Event()
        self.warmup_gate.set()
        self.generate_gate = threading.Event()
        self.generate_gate.set()
        self.generating = threading.Event()
        self.fail_with = fail_with
        self.batches: list[int] = []

    def encode(self, text):
        return [ord(c) for c in text] or [0]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def warmup(self):
        assert self.warmup_gate.wait(10)

    def generate(self, rows):
        self.generating.set()
        assert self.generate_gate.wait(10)
        self.batches.append(len(rows))
        if self.fail_with is not None:
            raise self.fail_with
        return [list(reversed(r.prompt_ids))[: r.max_tokens] for r in rows]
