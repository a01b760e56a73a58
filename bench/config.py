"""What the benchmark runs: the fixed prompts, the scenarios, the baselines and the bars.

Three presets. `full` is the standing benchmark (DistilGPT2 shape, 64 new tokens, 1/8/32
clients, plus 8 identical prompts and a long-context pair with 128 new tokens); `tiny` runs the
same scenarios at a size that proves the harness end to end in a test (tiny model, 8 new
tokens, 1/2/4 clients) and means nothing as a measurement. Both end with issue 8's streaming
scenarios (head-of-line blocking, uneven load, the cost of streaming). `llama` is of small scope
for the Llama-family shapes (`--model-shape`, SmolLM2-135M's by default): the short prompt at 1
client and the mixed prompts at 8, 64 new tokens, against PyTorch at batch 1 and batch 8.

Each preset is run against up to three service backends (`BACKENDS`), each started cold: LiteRT
with int8 weights (every scenario; the issue's bars), LiteRT fp32 (the single-client bar and
exact text) and the TensorFlow/XLA backend (the earlier bars; GPT-2 only: it serves TensorFlow
weights). Peers (PEERS: llama.cpp's llama-server) run after them on the same weights, each
weight type in its own cold phase, through the scenarios of the backends they are compared with.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

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


# The long-context prompts: paragraphs of English and code, 83 to 125 tokens each with the
# DistilGPT2-shape test tokenizer. Long prompt i is the 4 paragraphs from i on (wrapping round):
# 369 to 427 tokens, mean 398 (tests/test_bench.py checks the range with that tokenizer).
LONG_PARAGRAPHS = (
    "A request to the service carries one or more prompts, a limit on new tokens and a"
    " temperature. The server checks each prompt against the context window before it queues"
    " anything, so a request that cannot be served is refused at once with a clear error,"
    " instead of failing after it has waited for a batch. Every answer is returned in the order"
    " of the prompts, whatever rows the prompts happened to share a batch with.\n\n",
    "def pad_left(rows, width, pad_id):\n"
    '    """Pad every row on the left to `width` tokens and return the rows with their masks."""\n'
    "    out, masks = [], []\n"
    "    for row in rows:\n"
    "        gap = width - len(row)\n"
    "        out.append([pad_id] * gap + list(row))\n"
    "        masks.append([0] * gap + [1] * len(row))\n"
    "    return out, masks\n\n",
    "The key and value cache holds, for every layer, the projections of the tokens seen so far."
    " Each decoding step reads all of it and appends one slot per row, which is why the cost of"
    " a step grows with the length of the context and why long prompts make batching harder:"
    " the rows that share a cache must also share its size. A cache of fixed size per bucket keeps"
    " the shapes the runtime sees to a small known set.\n\n",
    "class TokenBucket:\n"
    '    """Allow `rate` events per second on average, with bursts of at most `capacity`."""\n\n'
    "    def __init__(self, rate, capacity):\n"
    "        self.rate, self.capacity = rate, capacity\n"
    "        self.tokens, self.stamp = capacity, time.monotonic()\n\n"
    "    def take(self):\n"
    "        now = time.monotonic()\n"
    "        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)\n"
    "        self.stamp = now\n"
    "        return self.tokens >= 1 and self._spend()\n\n",
    "Quantized weights make each matrix four times smaller, so a step that is bound by reading"
    " weights from memory runs faster, while the arithmetic on the activations stays in floating"
    " point. The price is a small change in the numbers, which is measured by how often the"
    " quantized model picks the same next token as the original. A gate that compares the two"
    " on held-out text decides which precision the service uses.\n\n",
    "import json\nfrom pathlib import Path\n\n\n"
    "def load_settings(path: Path) -> dict:\n"
    "    with path.open(encoding='utf-8') as f:\n"
    "        data = json.load(f)\n"
    "    unknown = set(data) - {'host', 'port', 'workers', 'timeout'}\n"
    "    if unknown:\n"
    "        raise ValueError(f'unknown settings: {sorted(unknown)}')\n"
    "    return {'host': '127.0.0.1', 'port': 8000, 'workers': 1, 'timeout': 30.0, **data}\n\n",
    "When many clients wait for an answer at the same time, the scheduler decides which rows run"
    " together. A batch that is too small leaves the cores idle between memory reads; a batch"
    " that is too large makes every client wait for the slowest row. A short wait before each"
    " batch lets clients that were answered together come back together, at the cost of a few"
    " milliseconds for the first client of each batch.\n\n",
    "for attempt in range(retries):\n"
    "    try:\n"
    "        response = client.post('/generate', json=body, timeout=60)\n"
    "    except ConnectionError as exc:\n"
    "        log.warning('attempt %d failed: %s', attempt, exc)\n"
    "        time.sleep(min(2 ** attempt, 30))\n"
    "        continue\n"
    "    if response.status_code == 503:\n"
    "        time.sleep(float(response.headers.get('Retry-After', 1)))\n"
    "        continue\n"
    "    break\n\n",
)

LONG_PARAGRAPHS_PER_PROMPT = 4


def long_prompts(paragraphs: int = LONG_PARAGRAPHS_PER_PROMPT) -> tuple[str, ...]:
    """The 8 long prompts, each `paragraphs` consecutive paragraphs (fixed text, fixed order)."""
    n = len(LONG_PARAGRAPHS)
    return tuple("".join(LONG_PARAGRAPHS[(i + j) % n] for j in range(paragraphs)).rstrip() for i in range(n))


LONG_PROMPTS = long_prompts()

SAMPLING_TEMPERATURE = 0.8


@dataclass(frozen=True)
class Scenario:
    """One load pattern against the service: `clients` concurrent clients share `requests`."""

    name: str
    # What the bars call it: single, single_sampled, batch, batch_sampled, batch_filtered (top-k
    # and top-p), batch_nucleus (top-p alone), same (8 identical prompts), long_single,
    # long_batch, overload, window (8 rows filling the context window: memory).
    role: str
    clients: int
    requests: int
    prompts: tuple[str, ...]
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0  # 0 and 1.0: off
    top_p: float = 1.0

    @property
    def sampled(self) -> bool:
        return self.temperature > 0

    @property
    def checks_texts(self) -> bool:
        """Whether its greedy texts join the determinism and baseline checks: not the window
        scenario's, which asks the same prompts for another number of tokens."""
        return not self.sampled and self.role != "window"

    def request_prompts(self) -> list[str]:
        return [self.prompts[i % len(self.prompts)] for i in range(self.requests)]


@dataclass(frozen=True)
class HeadOfLine:
    """A short request's latency idle and while `long_clients` stream long answers (issue 8).

    The short request is timed `idle_repetitions` times on the idle server first, then in each
    of `repetitions` rounds: the long clients start together and, once every one of them has
    streamed its first piece (all are decoding), short requests go out one after another until
    the long answers end, so they meet the long rows at every length (a late one attends over a
    cache several times larger than an early one). Only those answered while every long request
    still streamed count. The short request is unstreamed both times: its latency is the time
    to its whole answer, timed alike.
    """

    name: str
    long_clients: int
    long_prompts: tuple[str, ...]
    long_max_tokens: int
    short_prompt: str
    short_max_tokens: int
    idle_repetitions: int
    repetitions: int
    role: str = "head_of_line"


@dataclass(frozen=True)
class UnevenLoad:
    """`clients` clients with think times and uneven `max_tokens` against the same requests in
    lockstep rounds (issue 8).

    The workload is `rounds` rounds of one request per client; request (round r, client c) has
    prompt `prompts[(r + c) % len(prompts)]`, a `max_tokens` drawn uniformly from
    `max_tokens_range` and a think time drawn uniformly from 0 to `think_max_s`, all from one
    `random.Random(seed)`. Uneven: each client thinks, sends, waits for its answer, and goes on
    with its next round at once. Lockstep: each round's requests go out together and the next
    round starts when all are answered, without think times: the same requests, the same tokens.
    That is the fair baseline: both halves ask for the same work from the same number of clients,
    and differ only in when requests arrive. Lockstep is what static batching serves best (a
    round is one batch); the uneven half's wall time includes its think times, which only count
    against it.
    """

    name: str
    clients: int
    rounds: int
    prompts: tuple[str, ...]
    max_tokens_range: tuple[int, int]
    think_max_s: float
    seed: int
    role: str = "uneven_load"

    def workload(self) -> list[list[tuple[float, dict]]]:
        """Per round, per client: (think time in seconds, /generate body), streamed and greedy."""
        rng = random.Random(self.seed)
        lo, hi = self.max_tokens_range
        rounds = []
        for r in range(self.rounds):
            row = []
            for c in range(self.clients):
                max_tokens, think = rng.randint(lo, hi), rng.uniform(0.0, self.think_max_s)
                prompt = self.prompts[(r + c) % len(self.prompts)]
                row.append((think, {"prompts": [prompt], "max_tokens": max_tokens, "temperature": 0.0,
                                    "stream": True}))
            rounds.append(row)
        return rounds


@dataclass(frozen=True)
class StreamOverhead:
    """One request at a time, `repetitions` times each in turn: unstreamed, streamed, and
    unstreamed with max_tokens=1 (the prefill and one token: what the first piece may cost)."""

    name: str
    prompt: str
    max_tokens: int
    repetitions: int
    role: str = "stream_overhead"


StreamScenario = HeadOfLine | UnevenLoad | StreamOverhead


@dataclass(frozen=True)
class BaselineRun:
    """One baseline measurement: `prompts` in order, `batch_size` at a time, greedy."""

    name: str
    # short_b1 (the short prompt, one at a time), mixed_b1, mixed_b8, same_b8, long_b1, long_b8
    role: str
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
class Backend:
    """One service configuration, started cold in its own phase: its environment, what /health
    must then report, and the scenario roles it runs (None: all of them)."""

    name: str
    title: str
    env: dict[str, str]
    backend: str
    precision: str | None
    roles: tuple[str, ...] | None
    # Greedy text must equal the fp32 baselines' token for token (not so for int8 weights,
    # which change the numbers: int8 is compared on token counts only).
    exact_text: bool


# The filtered-sampling scenario's controls: common defaults of chat UIs and of transformers.
TOP_K, TOP_P = 50, 0.9

# int8 is forced: on the random-weight bench model the quality gate (litert.json) may reject
# int8, and LITERT_PRECISION=auto would then serve fp32.
BACKENDS = {
    "litert-int8": Backend("litert-int8", "LiteRT int8 (LITERT_PRECISION=int8 forced)",
                           {"BACKEND": "litert", "LITERT_PRECISION": "int8"}, "litert", "int8", None, False),
    "litert-fp32": Backend("litert-fp32", "LiteRT fp32", {"BACKEND": "litert", "LITERT_PRECISION": "fp32"},
                           "litert", "fp32", ("single", "batch"), True),
    "tf": Backend("tf", "TensorFlow/XLA (BACKEND=tf)", {"BACKEND": "tf"}, "tf", None,
                  ("single", "single_sampled", "batch", "batch_sampled", "overload"), True),
}
DEFAULT_BACKENDS = ("litert-int8", "litert-fp32", "tf")


# Peers: other servers run on the same weights through the same scenarios, each in its own cold
# phase after the service's (issue 21). llama.cpp's llama-server (bench/llamacpp.py) serves GGUF
# weights: q8_0 (int8 blocks of 32 weights with an fp16 scale each) beside the service's int8,
# f32 beside its fp32 (the tf backend computes in fp32 too).
PEERS = ("llamacpp",)
LLAMACPP_WEIGHTS = {"int8": "q8_0", "fp32": "f32"}


def parse_peers(text: str) -> tuple[str, ...]:
    """--peers: a comma-separated list of PEERS, or none."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["none"]:
        return ()
    unknown = [n for n in names if n not in PEERS]
    if unknown or not names:
        raise ValueError(f"--peers takes a comma-separated list of {', '.join(PEERS)}, or none; got {text!r}")
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class PeerPhase:
    """One peer configuration, started cold: llama-server on `weights` GGUF, compared with the
    service `backends` (names) whose precision those weights match, through the scenarios of
    any of them (in the preset's order)."""

    name: str
    weights: str
    backends: tuple[str, ...]
    scenarios: tuple[Scenario, ...]


def llamacpp_phases(preset: "Preset", backends: tuple[Backend, ...]) -> tuple[PeerPhase, ...]:
    """The llama-server phases a run with these service backends needs: one per GGUF weight type
    that one of them is compared with, q8_0 first."""
    phases = []
    for weights in dict.fromkeys(LLAMACPP_WEIGHTS.values()):
        matched = [b for b in backends if LLAMACPP_WEIGHTS[b.precision or "fp32"] == weights]
        if not matched:
            continue
        roles = {s.role for b in matched for s in preset.scenarios_for(b)}
        phases.append(PeerPhase(f"llamacpp-{weights}", weights, tuple(b.name for b in matched),
                                tuple(s for s in preset.scenarios if s.role in roles)))
    return tuple(phases)


# The model shapes the benchmark makes in its cache, by family: GPT-2's with TensorFlow weights
# (scripts/make_test_model.py, in the service's venv), the Llama family's as their hub
# repositories hold them, bfloat16 safetensors (bench/make_model.py, in the PyTorch venv).
MODEL_SHAPES = {"tiny": "gpt2", "distilgpt2": "gpt2", "smollm2-135m": "llama", "qwen2.5-0.5b": "llama"}

# The int8 bars of the llama preset, per shape: LiteRT int8 at 1 client vs PyTorch batch 1, and
# at 8 clients vs PyTorch batch 8. Another shape's ratios are reported against no bar.
LLAMA_BARS = {"smollm2-135m": {"single_vs_torch_b1": 3.0, "batch_vs_torch_b8": 2.0}}


def parse_backends(text: str) -> tuple[Backend, ...]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise ValueError(f"--backends takes a comma-separated list of {', '.join(BACKENDS)}; got {text!r}")
    return tuple(BACKENDS[n] for n in dict.fromkeys(names))


@dataclass(frozen=True)
class Preset:
    name: str
    model_shape: str  # a key of MODEL_SHAPES
    max_tokens: int
    long_max_tokens: int
    scenarios: tuple[Scenario, ...]
    tf_runs: tuple[BaselineRun, ...]
    torch_runs: tuple[BaselineRun, ...]
    # Environment the service gets unless --service-env says otherwise.
    service_env: dict[str, str] = field(default_factory=dict)
    # Extra arguments of bench/profile_step.py (the tiny run only proves that it works).
    profile_args: tuple[str, ...] = ()
    # How often a measurement shared with other processes is taken again (see cli.py).
    retries_when_shared: int = 0
    # Issue 8's scenarios (streaming, continuous batching); they run after `scenarios`.
    stream_scenarios: tuple[StreamScenario, ...] = ()
    # The backends run unless --backends says otherwise (names of BACKENDS, in order).
    backends: tuple[str, ...] = DEFAULT_BACKENDS
    # Cache slots of the per-op profiles of the int8 decode step (--profile-cache); () for none.
    profile_caches: tuple[int, ...] = (256, 640)
    # Seconds to wait for /health ok (--health-timeout).
    health_timeout: float = 600.0

    @property
    def family(self) -> str:
        return MODEL_SHAPES[self.model_shape]

    def scenarios_for(self, backend: Backend) -> tuple[Scenario, ...]:
        return tuple(s for s in self.scenarios if backend.roles is None or s.role in backend.roles)

    def stream_scenarios_for(self, backend: Backend) -> tuple[StreamScenario, ...]:
        return tuple(s for s in self.stream_scenarios if backend.roles is None or s.role in backend.roles)


PRESETS = ("full", "tiny", "llama")


def default_preset(shape: str | None) -> str:
    """The preset a run without --preset gets: llama for a Llama-family shape, else full."""
    return "llama" if shape is not None and MODEL_SHAPES[shape] == "llama" else "full"


def make_preset(name: str, shape: str | None = None) -> Preset:
    """The preset `name`, for model `shape` (default: the preset's own: distilgpt2, tiny,
    smollm2-135m). A Llama-family shape drops the tf backend, which serves GPT-2 alone."""
    if shape is not None and shape not in MODEL_SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; known: {', '.join(MODEL_SHAPES)}")
    if name == "llama":
        preset = _llama_preset(shape or "smollm2-135m")
    else:
        preset = _gpt2_preset(name)
        if shape is not None:
            preset = replace(preset, model_shape=shape)
    if preset.family != "gpt2":
        preset = replace(preset, backends=tuple(b for b in preset.backends if BACKENDS[b].backend != "tf"))
    return preset


def _llama_preset(shape: str) -> Preset:
    """Small scope: the single-client and 8-client greedy scenarios of `full` (same prompts, 64
    new tokens, half the 8-client requests) on LiteRT int8 and fp32, PyTorch at batch 1 and 8.
    On the 2-core AMD EPYC VM on 2026-12-05, with the model and its LiteRT files cached: 2 minutes
    for SmolLM2-135M's shape, 4.5 for Qwen2.5-0.5B's; a first run adds making the model (0.5 and
    1 minute) and converting it (about 4 minutes each)."""
    n, short, mixed = 64, (SHORT_PROMPT,), MIXED_PROMPTS
    return Preset(
        name="llama",
        model_shape=shape,
        max_tokens=n,
        long_max_tokens=n,
        scenarios=(Scenario("greedy_c1", "single", 1, 8, short, n), Scenario("greedy_c8", "batch", 8, 32, mixed, n)),
        tf_runs=(),
        torch_runs=(BaselineRun("short_b1", "short_b1", short * 3, 1, n), BaselineRun("mixed_b8", "mixed_b8", mixed * 2, 8, n)),
        retries_when_shared=1,
        backends=("litert-int8", "litert-fp32"),
        profile_caches=(),
    )


def _gpt2_preset(name: str) -> Preset:
    if name == "full":
        n, n_long, (c1, c8, c32), (r1, r8, r32), single_reps, b8_reps = 64, 128, (1, 8, 32), (8, 64, 128), 3, 2
        r_long1, r_long8, paragraphs = 4, 16, LONG_PARAGRAPHS_PER_PROMPT
        # MIXED_PROMPTS are at most 80 DistilGPT2 tokens: 944 more fills most of the window.
        n_window = 944
    elif name == "tiny":
        n, n_long, (c1, c8, c32), (r1, r8, r32), single_reps, b8_reps = 8, 8, (1, 2, 4), (2, 8, 8), 1, 1
        # One paragraph per long prompt: the tiny tokenizer (512 tokens) needs about 2.5 times
        # as many tokens for the same text.
        r_long1, r_long8, paragraphs = 2, 8, 1
        n_window = 16
    else:
        raise ValueError(f"unknown preset {name!r}")
    short, mixed, same = (SHORT_PROMPT,), MIXED_PROMPTS, (SHORT_PROMPT,) * 8
    longs = long_prompts(paragraphs)
    t = SAMPLING_TEMPERATURE
    scenarios = (
        Scenario(f"greedy_c{c1}", "single", c1, r1, short, n),
        Scenario(f"sampled_c{c1}", "single_sampled", c1, r1, short, n, t),
        Scenario(f"greedy_c{c8}", "batch", c8, r8, mixed, n),
        Scenario(f"sampled_c{c8}", "batch_sampled", c8, r8, mixed, n, t),
        # Issue 9: top-k and top-p cost at most 15% per token over plain sampling at batch 8.
        Scenario(f"topkp_c{c8}", "batch_filtered", c8, r8, mixed, n, t, top_k=TOP_K, top_p=TOP_P),
        # top_p alone filters the whole vocabulary, not top_k's few candidates: its own bar.
        Scenario(f"topp_c{c8}", "batch_nucleus", c8, r8, mixed, n, t, top_p=TOP_P),
        Scenario(f"same_c{c8}", "same", c8, r8, same, n),
        # Before the long prompts: the memory bar is the peak from process start through 32 clients,
        # and TFLite keeps the arena the long prompts' larger cache grows (reported after them).
        Scenario(f"greedy_c{c32}", "overload", c32, r32, mixed, n),
        Scenario(f"long_c{c1}", "long_single", c1, r_long1, longs[:2], n_long),
        Scenario(f"long_c{c8}", "long_batch", c8, r_long8, longs, n_long),
        # Last: 8 rows filling the window, the largest pool the default settings allow; its peak
        # from process start must stay under the 1 GB default container limit.
        Scenario(f"window_c{c8}", "window", c8, len(mixed), mixed, n_window),
    )
    if name == "full":
        # About 2 minutes together (estimate): 4 x 512 tokens at batch 4-5 take ~9 s a round.
        stream_scenarios = (
            HeadOfLine("head_of_line", 4, MIXED_PROMPTS[:4], 512, SHORT_PROMPT, 16, 5, 3),
            UnevenLoad("uneven_c8", 8, 10, mixed, (16, 256), 0.5, 8),
            StreamOverhead("stream_overhead", SHORT_PROMPT, 128, 5),
        )
    else:
        # The tiny service batches at most 4 rows: 3 long clients leave the short request a row.
        stream_scenarios = (
            HeadOfLine("head_of_line", 3, MIXED_PROMPTS[:3], 900, SHORT_PROMPT, 16, 2, 1),
            UnevenLoad("uneven_c4", 4, 2, mixed, (4, 32), 0.05, 8),
            StreamOverhead("stream_overhead", SHORT_PROMPT, 32, 2),
        )
    single = BaselineRun("short_b1", "short_b1", short * single_reps, 1, n)
    mixed_b1 = BaselineRun("mixed_b1", "mixed_b1", mixed, 1, n)
    # The batch-8 baselines always batch 8, as the service's default MAX_BATCH_SIZE does.
    mixed_b8 = BaselineRun("mixed_b8", "mixed_b8", mixed * b8_reps, 8, n)
    same_b8 = BaselineRun("same_b8", "same_b8", same * b8_reps, 8, n)
    long_b1 = BaselineRun("long_b1", "long_b1", longs[:2], 1, n_long)
    long_b8 = BaselineRun("long_b8", "long_b8", longs, 8, n_long)
    return Preset(
        name=name,
        model_shape="distilgpt2" if name == "full" else "tiny",
        max_tokens=n,
        long_max_tokens=n_long,
        scenarios=scenarios,
        # The naive TF eager baseline only backs the TF backend's bar (it is slow: 3.5 tok/s).
        tf_runs=(single, mixed_b1),
        torch_runs=(single, mixed_b1, mixed_b8, same_b8, long_b1, long_b8),
        # The tiny run never has more than 4 requests in flight: compiling no batch-8 programs
        # cuts its warm-up by a quarter. The full run keeps the service's defaults.
        service_env={} if name == "full" else {"MAX_BATCH_SIZE": "4"},
        profile_args=("--repeats", "7") if name == "full" else ("--repeats", "2", "--flush-mib", "8"),
        retries_when_shared=2 if name == "full" else 0,
        stream_scenarios=stream_scenarios,
        health_timeout=600.0 if name == "full" else 300.0,
    )
