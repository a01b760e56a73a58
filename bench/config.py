"""What the benchmark runs: the fixed prompts, the scenarios, the baselines and the bars.

Two presets. `full` is the standing benchmark (DistilGPT2 shape, 64 new tokens, 1/8/32
clients); `tiny` runs the same scenarios at a size that proves the harness end to end in a
test (tiny model, 8 new tokens, 1/2/4 clients) and means nothing as a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# 16 tokens with the DistilGPT2-shape test tokenizer: the prompt of the single-client bar.
SHORT_PROMPT = "The service keeps a queue of requests and decodes them in batches of eight."

# Mixed lengths, 2 to 80 tokens with that tokenizer (mean 30), in a fixed order; concurrent
# scenarios send them round-robin, so each batch the server forms holds unequal prompts.
MIXED_PROMPTS = (
    "import os",
    "Return the number of bytes in the buffer.",
    SHORT_PROMPT,
    'def read_config(path):\n    """Read the settings file and return a dict."""\n',
    "The scheduler forms a batch from the waiting requests, pads the prompts to a common length"
    " and runs one decoding step for every row.",
    "Write a short note for the release: the server now answers health checks while the model"
    " loads, rejects requests with a clear error when its queue is full, and reports how many"
    " tokens it generated since it started.",
    "class LRUCache:\n"
    '    """A mapping that forgets its least recently used entry once it holds more than maxsize'
    ' items."""\n\n'
    "    def __init__(self, maxsize=128):\n"
    "        self.maxsize = maxsize\n"
    "        self.data = {}\n",
    "An HTTP server reads a request line, then headers until an empty line, then a body whose"
    " length the Content-Length header gives; it answers with a status line, its own headers and"
    " a body. Keep-alive lets one connection carry many such exchanges, which saves the cost of a"
    " new handshake for each request, but a server must then bound how long an idle connection"
    " may stay open.",
)

SAMPLING_TEMPERATURE = 0.8


@dataclass(frozen=True)
class Scenario:
    """One load pattern against the service: `clients` concurrent clients share `requests`."""

    name: str
    role: str  # what the bars call it: single, single_sampled, batch, batch_sampled, overload
    clients: int
    requests: int
    prompts: tuple[str, ...]
    max_tokens: int
    temperature: float = 0.0

    @property
    def sampled(self) -> bool:
        return self.temperature > 0

    def request_prompts(self) -> list[str]:
        return [self.prompts[i % len(self.prompts)] for i in range(self.requests)]


@dataclass(frozen=True)
class BaselineRun:
    """One baseline measurement: `prompts` in order, `batch_size` at a time, greedy."""

    name: str
    role: str  # single (the short prompt, one at a time), mixed_b1, mixed_b8
    prompts: tuple[str, ...]
    batch_size: int
    max_new_tokens: int

    def job(self) -> dict:
        return {
            "name": self.name,
            "prompts": list(self.prompts),
            "batch_size": self.batch_size,
            "max_new_tokens": self.max_new_tokens,
        }


@dataclass(frozen=True)
class Preset:
    name: str
    model_shape: str  # scripts/make_test_model.py --shape
    max_tokens: int
    scenarios: tuple[Scenario, ...]
    tf_runs: tuple[BaselineRun, ...]
    torch_runs: tuple[BaselineRun, ...]
    # Environment the service gets unless --service-env says otherwise.
    service_env: dict[str, str] = field(default_factory=dict)


def make_preset(name: str) -> Preset:
    if name == "full":
        n, (c1, c8, c32), (r1, r8, r32), single_reps, b8_reps = 64, (1, 8, 32), (8, 64, 128), 3, 2
    elif name == "tiny":
        n, (c1, c8, c32), (r1, r8, r32), single_reps, b8_reps = 8, (1, 2, 4), (2, 8, 8), 1, 1
    else:
        raise ValueError(f"unknown preset {name!r}")
    short, mixed = (SHORT_PROMPT,), MIXED_PROMPTS
    t = SAMPLING_TEMPERATURE
    scenarios = (
        Scenario(f"greedy_c{c1}", "single", c1, r1, short, n),
        Scenario(f"sampled_c{c1}", "single_sampled", c1, r1, short, n, t),
        Scenario(f"greedy_c{c8}", "batch", c8, r8, mixed, n),
        Scenario(f"sampled_c{c8}", "batch_sampled", c8, r8, mixed, n, t),
        Scenario(f"greedy_c{c32}", "overload", c32, r32, mixed, n),
    )
    single = BaselineRun("short_b1", "single", short * single_reps, 1, n)
    mixed_b1 = BaselineRun("mixed_b1", "mixed_b1", mixed, 1, n)
    # The batch-8 baseline always batches 8, as the service's default MAX_BATCH_SIZE does.
    mixed_b8 = BaselineRun("mixed_b8", "mixed_b8", mixed * b8_reps, 8, n)
    return Preset(
        name=name,
        model_shape="distilgpt2" if name == "full" else "tiny",
        max_tokens=n,
        scenarios=scenarios,
        tf_runs=(single, mixed_b1),
        torch_runs=(single, mixed_b1, mixed_b8),
        # The tiny run never has more than 4 requests in flight: compiling no batch-8 programs
        # cuts its warm-up by a quarter. The full run keeps the service's defaults.
        service_env={} if name == "full" else {"MAX_BATCH_SIZE": "4"},
    )
