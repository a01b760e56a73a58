"""A stand-in engine for HTTP and scheduling behaviour that does not depend on the model."""

import threading

from service.engine import DecodeBatch, Engine, RowUpdate


class FakeEngine(Engine):
    """Characters as tokens; each row's output is its prompt reversed, one character a decode
    call, cut to max_tokens; the character "0" is end-of-text.

    `warmup` and each decode call can be held at a gate, to observe the server while they run.
    """

    context_window = 128
    vocab_size = 0x110000  # every Unicode code point
    max_batch_size = 64
    backend = "fake"
    eos_id = ord("0")

    def __init__(self, fail_with: Exception | None = None):
        self.warmup_gate = threading.Event()
        self.warmup_gate.set()
        self.generate_gate = threading.Event()
        self.generate_gate.set()
        self.generating = threading.Event()
        self.fail_with = fail_with
        self.calls: list[list] = []  # the keys of the rows in each decode call

    def encode(self, text):
        return [ord(c) for c in text] or [0]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def warmup(self):
        assert self.warmup_gate.wait(10)

    def new_batch(self):
        return FakeBatch(self)


class FakeBatch(DecodeBatch):
    def __init__(self, engine: FakeEngine):
        self.engine = engine
        self.rows = {}  # key -> [remaining output, max_tokens, produced]

    @property
    def keys(self):
        return list(self.rows)

    def extend(self, entries):
        for key, row in entries:
            self.rows[key] = [list(reversed(row.prompt_ids)), row.max_tokens, 0]

    def step(self):
        engine = self.engine
        engine.generating.set()
        assert engine.generate_gate.wait(10)
        engine.calls.append(self.keys)
        if engine.fail_with is not None:
            raise engine.fail_with
        updates = []
        for key, state in self.rows.items():
            token = state[0].pop(0) if state[0] else engine.eos_id
            if token == engine.eos_id:
                updates.append(RowUpdate(key, [], "eos_token"))
                continue
            state[2] += 1
            updates.append(RowUpdate(key, [token], "length" if state[2] >= state[1] else None))
        return updates

    def filter(self, keys):
        self.rows = {key: self.rows[key] for key in keys}
