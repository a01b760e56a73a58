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
    eos_ids = frozenset({eos_id})

    def __init__(self, fail_with: Exception | None = None):
        self.warmup_gate = threading.Event()
        self.warmup_gate.set()
        self.generate_gate = threading.Event()
        self.generate_gate.set()
        self.generating = threading.Event()
        self.fail_with = fail_with
        self.calls: list[list] = []  # the keys of the rows in each decode call

    def encode(self, text, special_tokens=True):
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


class InjectedFault(RuntimeError):
    """A failure a test put into a decode call on purpose."""


class RecordingEngine(Engine):
    """A real engine whose batches record what the scheduler does with them, and fail on demand.

    Every decode call's keys go to `calls`, every `extend`'s entries to `extends`, every
    update to `updates` (per call). `raise_next` ("before" or "after" the real call) makes the
    next decode call raise `InjectedFault` ("extend": the next `extend`); a key in `error_keys` gets, at its next update, a
    `RowUpdate` with `error=InjectedFault` instead, and stays in the real batch until the
    scheduler filters it out (DecodeBatch's contract). With `budget`, admission meets a memory
    budget of that many slots (`batch_bytes` counts one per prompt and new token, at full
    length). Everything else is the real engine's.
    """

    def __init__(self, inner: Engine, budget: int | None = None):
        self.inner = inner
        self.budget = budget
        self.context_window = inner.context_window
        self.vocab_size = inner.vocab_size
        self.max_batch_size = inner.max_batch_size
        self.backend = inner.backend
        self.eos_id = getattr(inner, "eos_id", None)
        self.eos_ids = getattr(inner, "eos_ids", frozenset())
        self.byte_fallback_ids = inner.byte_fallback_ids
        self.memory_budget = inner.memory_budget if budget is None else budget
        self.calls: list[list] = []
        self.extends: list[list] = []
        self.updates: list[list[RowUpdate]] = []
        self.raised: list[list] = []  # the keys of each call made to raise
        self.errored: list = []  # the keys given an error update
        self.raise_next: str | None = None
        self.error_keys: set = set()
        self.batches: list[RecordingBatch] = []

    def encode(self, text, special_tokens=True):
        return self.inner.encode(text)

    def decode(self, ids):
        return self.inner.decode(ids)

    def warmup(self):
        pass

    def new_batch(self):
        batch = RecordingBatch(self, self.inner.new_batch())
        self.batches.append(batch)
        return batch

    def check_fits(self, index, prompt_ids, max_tokens):
        if self.budget is not None:
            return Engine.check_fits(self, index, prompt_ids, max_tokens)
        return self.inner.check_fits(index, prompt_ids, max_tokens)

    def batch_bytes(self, rows):
        """With a `budget`, a made-up measure: a byte per slot at full length."""
        if self.budget is not None:
            return sum(len(row.prompt_ids) + row.max_tokens for row in rows)
        return self.inner.batch_bytes(rows)

    def kv_slots_used(self):
        return self.inner.kv_slots_used()

    def kv_bytes_reserved(self):
        return self.inner.kv_bytes_reserved()


class RecordingBatch(DecodeBatch):
    def __init__(self, engine: RecordingEngine, inner: DecodeBatch):
        self.engine = engine
        self.inner = inner

    @property
    def keys(self):
        return self.inner.keys

    def extend(self, entries):
        entries = list(entries)
        engine = self.engine
        engine.extends.append(entries)
        if engine.raise_next == "extend":
            engine.raise_next = None
            engine.raised.append(self.keys + [key for key, _ in entries])
            raise InjectedFault("injected into extend")
        self.inner.extend(entries)

    def step(self):
        engine = self.engine
        keys = self.keys
        engine.calls.append(keys)
        fault = engine.raise_next
        if fault in ("before", "after"):
            engine.raise_next = None
        if fault == "before":
            engine.raised.append(keys)
            raise InjectedFault("injected before the call")
        updates = self.inner.step()
        if fault == "after":
            engine.raised.append(keys)
            raise InjectedFault("injected after the call")
        failing = [u.key for u in updates if u.key in engine.error_keys]
        if failing:
            engine.error_keys -= set(failing)
            engine.errored += failing
            updates = [RowUpdate(u.key, [], None, error=InjectedFault(f"injected for row {u.key}"))
                       if u.key in failing else u for u in updates]
        engine.updates.append(updates)
        return updates

    def filter(self, keys):
        self.inner.filter(keys)
