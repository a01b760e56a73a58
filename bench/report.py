"""From raw measurements to the result: scenario figures, ratios, the bars, JSON and Markdown."""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.config import LLAMA_BARS
from bench.cpu import SHARED_CORES
from bench.load import LoadResult, percentile

PEAK_RSS_LIMIT_MIB = 1.5e9 / 2**20  # the TF bar says 1.5 GB; decimal, the stricter reading
WARMUP_LIMIT_S = 90.0
PEAK_RSS_LIMIT_LITERT_MIB = 400e6 / 2**20  # issue 7: 400 MB, read the same way
WINDOW_RSS_LIMIT_MIB = 1024  # docker-compose.yml's default API_MEM_LIMIT, 1g
WARMUP_LIMIT_LITERT_S = 10.0


def machine_facts() -> dict:
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_kb / 2**20, 1) if mem_kb else None,
        "kernel": platform.release(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }


def scenario_result(scenario, load: LoadResult, metrics_before: dict, metrics_after: dict, memory: dict) -> dict:
    ok = [o for o in load.outcomes if o.latency is not None]
    latencies = [o.latency for o in ok]
    ttfts = [o.ttft for o in ok]
    tpots = [o.tpot for o in ok if o.tpot is not None]
    errors = [o.error for o in load.outcomes if o.error]
    delta = None
    if "llm_generated_tokens_total" in metrics_after:
        delta = int(round(metrics_after["llm_generated_tokens_total"] - metrics_before.get("llm_generated_tokens_total", 0)))
    wall = load.wall_seconds
    calls = rows = None
    if "llm_batch_rows_count" in metrics_after:  # one observation per decode call: the rows in it
        calls = int(round(metrics_after["llm_batch_rows_count"] - metrics_before.get("llm_batch_rows_count", 0)))
        rows = metrics_after["llm_batch_rows_sum"] - metrics_before.get("llm_batch_rows_sum", 0)
    return {
        "name": scenario.name,
        "role": scenario.role,
        "clients": scenario.clients,
        "requests": scenario.requests,
        "max_tokens": scenario.max_tokens,
        "temperature": scenario.temperature,
        "top_k": scenario.top_k,
        "top_p": scenario.top_p,
        "distinct_prompts": len(scenario.prompts),
        "ok": len(ok),
        "errors": len(errors),
        "error_samples": errors[:5],
        "responses_503": sum(o.rejected_503 for o in load.outcomes),
        "requests_with_503": sum(1 for o in load.outcomes if o.rejected_503),
        "wall_seconds": wall,
        "new_tokens": delta,
        "tokens_per_request": delta / len(ok) if delta is not None and ok else None,
        "max_new_tokens_total": len(ok) * scenario.max_tokens,
        "tok_per_s": delta / wall if delta is not None and wall > 0 else None,
        "req_per_s": len(ok) / wall if wall > 0 else None,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p95_s": percentile(latencies, 95),
        "latency_mean_s": statistics.fmean(latencies) if latencies else None,
        "latency_max_s": max(latencies) if latencies else None,
        # Per streamed request: first attempt to its first token, and (latency - TTFT) / (tokens - 1)
        # for requests of 2 tokens or more (the tokens are the final event's count).
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p95_s": percentile(ttfts, 95),
        "tpot_p50_s": percentile(tpots, 50),
        "tpot_p95_s": percentile(tpots, 95),
        "tpot_requests": len(tpots),
        # The same tokens counted by the client, from the streams' final events.
        "new_tokens_streamed": sum(o.generated_tokens for o in ok),
        "compiles_after_warmup": metrics_after.get("llm_compiles_after_warmup_total"),
        "decode_calls": calls,
        # How full the running batch was: its mean rows per decode call.
        "rows_per_call": rows / calls if calls else None,
        "vmhwm_mib": memory["vmhwm_mib"],
        "vmrss_mib": memory["vmrss_mib"],
    }


def baseline_result(run: dict, framework: str) -> dict:
    lat = run["latencies"]
    return {
        "cpu": run.get("cpu"),
        "name": run["name"],
        "framework": framework,
        "batch_size": run["batch_size"],
        "requests": run["requests"],
        "max_new_tokens": run["max_new_tokens"],
        "new_tokens": run["new_tokens"],
        "tokens_per_request": run["new_tokens"] / run["requests"],
        "eos_stops": run["eos_stops"],
        "seconds": run["seconds"],
        "tok_per_s": run["tok_per_s"],
        "req_per_s": run["req_per_s"],
        "latency_p50_s": percentile(lat, 50),
        "latency_p95_s": percentile(lat, 95),
        "prompt_tokens": run["prompt_tokens"],
        "attempts": run.get("attempts", 1),
    }


@dataclass
class Bar:
    id: str
    text: str
    measured: str
    target: str
    holds: bool | None  # None: could not be measured in this run
    phase: str = ""
    # A measurement it rests on shared the machine with other processes: not to be trusted.
    shared: bool = False


def _ratio(a, b):
    return a / b if a is not None and b else None


def fmt_bar(x, spec=".2f", suffix=""):
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def _at_least(x, limit):
    return None if x is None else x >= limit


def _at_most(x, limit):
    return None if x is None else x <= limit


def compute_ratios(scenarios: dict, baselines: dict) -> dict:
    """Every ratio the bars and the report use; `baselines` maps 'tf:name' and 'pt:name'."""
    by_role = {s["role"]: s for s in scenarios.values()}
    tps = lambda role: by_role.get(role, {}).get("tok_per_s")  # noqa: E731
    base = lambda key: (baselines.get(key) or {}).get("tok_per_s")  # noqa: E731
    return {
        "single_vs_torch_b1": _ratio(tps("single"), base("pt:short_b1")),
        "single_vs_naive_tf": _ratio(tps("single"), base("tf:short_b1")),
        "batch_vs_torch_b8": _ratio(tps("batch"), base("pt:mixed_b8")),
        "batch_vs_torch_b1": _ratio(tps("batch"), base("pt:mixed_b1")),
        "batch_vs_naive_tf": _ratio(tps("batch"), base("tf:mixed_b1")),
        "same_vs_torch_b8": _ratio(tps("same"), base("pt:same_b8")),
        "long_single_vs_torch_b1": _ratio(tps("long_single"), base("pt:long_b1")),
        "long_batch_vs_torch_b8": _ratio(tps("long_batch"), base("pt:long_b8")),
        "overload_vs_batch": _ratio(tps("overload"), tps("batch")),
        "sampling_cost_single": _ratio(tps("single"), tps("single_sampled")),
        "sampling_cost_batch": _ratio(tps("batch"), tps("batch_sampled")),
        "filtering_cost_batch": _ratio(tps("batch_sampled"), tps("batch_filtered")),
        "nucleus_cost_batch": _ratio(tps("batch_sampled"), tps("batch_nucleus")),
        "torch_b8_vs_naive_tf": _ratio(base("pt:mixed_b8"), base("tf:mixed_b1")),
        "torch_b8_vs_b1": _ratio(base("pt:mixed_b8"), base("pt:mixed_b1")),
    }


# The measurements each ratio rests on: scenario roles, and baselines as 'fw:name'.
RATIO_PARTS = {
    "single_vs_torch_b1": ("single", "pt:short_b1"),
    "batch_vs_torch_b8": ("batch", "pt:mixed_b8"),
    "batch_vs_naive_tf": ("batch", "tf:mixed_b1"),
    "same_vs_torch_b8": ("same", "pt:same_b8"),
    "long_single_vs_torch_b1": ("long_single", "pt:long_b1"),
    "long_batch_vs_torch_b8": ("long_batch", "pt:long_b8"),
    "overload_vs_batch": ("overload", "batch"),
    "sampling_cost": ("single", "single_sampled", "batch", "batch_sampled"),
    "filtering_cost_batch": ("batch_sampled", "batch_filtered"),
    "nucleus_cost_batch": ("batch_sampled", "batch_nucleus"),
}


HEAD_OF_LINE_LIMIT = 3.0  # issue 8: loaded latency of the short request ÷ its idle latency
UNEVEN_VS_LOCKSTEP_MIN = 0.8
STREAM_OVERHEAD_LIMIT = 1.05
FIRST_PIECE_DECODE_STEPS = 2


def stream_measurements(streams: dict) -> list[tuple[str, dict]]:
    """Each separately measured part of issue 8's scenarios, named: the uneven-load scenario has
    two (its lockstep and uneven halves), the others one each."""
    parts = []
    for name, s in streams.items():
        if s.get("role") == "uneven_load":
            parts += [(f"{name} ({half})", s[half]) for half in ("uneven", "lockstep") if half in s]
        else:
            parts.append((name, s))
    return parts


def _failed(*parts) -> bool:
    return any((p or {}).get("errors") for p in parts)


def stream_bars(streams: dict, shared) -> list[Bar]:
    """Issue 8's bars: head-of-line blocking, uneven load, and the cost of streaming.

    A bar whose requests failed does not hold; one whose scenario did not run reads n/a.
    """
    by_role = {s.get("role"): s for s in streams.values()}
    hol, uneven, over = (by_role.get(r) or {} for r in ("head_of_line", "uneven_load", "stream_overhead"))

    ratio = hol.get("ratio")
    rounds = len(hol.get("rounds") or [])
    hol_holds = _at_most(ratio, HEAD_OF_LINE_LIMIT)
    if hol_holds and not hol.get("loaded_requests"):
        hol_holds = None  # no short request was answered while every long one streamed
    if _failed(hol):
        hol_holds = False
    hol_bar = Bar(
        "head_of_line", f"{hol.get('name', 'head_of_line')}: a {hol.get('short_max_tokens', '?')}-token greedy request "
        f"while {hol.get('long_clients', '?')} clients stream {hol.get('long_max_tokens', '?')} tokens each (sent one "
        "after another from start to end of the long answers): median latency vs the same request on the idle server",
        f"{fmt_bar(ratio, '.2f', '×')} ({fmt_bar(hol.get('loaded_latency_p50_s'), '.3f', ' s')} vs "
        f"{fmt_bar(hol.get('idle_latency_p50_s'), '.3f', ' s')} idle; worst {fmt_bar(hol.get('ratio_worst'), '.2f', '×')}; "
        f"{hol.get('loaded_requests', 0)} requests in {rounds} rounds; {hol.get('errors', 'n/a')} errors)",
        f"≤ {HEAD_OF_LINE_LIMIT:.1f}×", hol_holds, shared=shared(hol))

    u, lock = uneven.get("uneven") or {}, uneven.get("lockstep") or {}
    ratio = _ratio(u.get("tok_per_s"), lock.get("tok_per_s"))
    lo, hi = uneven.get("max_tokens_range") or ("?", "?")
    ttft_server = (u.get("server") or {}).get("ttft") or {}
    uneven_bar = Bar(
        "uneven_vs_lockstep", f"{uneven.get('name', 'uneven')}: {uneven.get('clients', '?')} clients, think times "
        f"0–{fmt_bar(uneven.get('think_max_s') and uneven['think_max_s'] * 1000, '.0f')} ms, {lo}–{hi} new tokens: "
        "total tok/s vs the same requests in lockstep rounds; p95 time to first token (client, server)",
        f"{fmt_bar(ratio, '.2f', '×')} ({fmt_bar(u.get('tok_per_s'), '.1f')} vs "
        f"{fmt_bar(lock.get('tok_per_s'), '.1f')} tok/s); TTFT p95 {fmt_bar(u.get('ttft_p95_s'), '.3f', ' s')} "
        f"(server {fmt_bar(ttft_server.get('p95_s'), '.3f', ' s')})",
        f"≥ {UNEVEN_VS_LOCKSTEP_MIN}×", False if _failed(u, lock) else _at_least(ratio, UNEVEN_VS_LOCKSTEP_MIN),
        shared=shared(u, lock))

    ratio = over.get("ratio")
    overhead_bar = Bar(
        "stream_overhead", f"{over.get('name', 'stream_overhead')}: streamed vs unstreamed, total time, "
        f"{over.get('max_tokens', '?')} new tokens, batch 1 (medians of {over.get('repetitions', '?')})",
        f"{fmt_bar(ratio, '.3f', '×')} ({fmt_bar(over.get('streamed_p50_s'), '.3f', ' s')} vs "
        f"{fmt_bar(over.get('unstreamed_p50_s'), '.3f', ' s')})",
        f"≤ {STREAM_OVERHEAD_LIMIT}×", False if _failed(over) else _at_most(ratio, STREAM_OVERHEAD_LIMIT),
        shared=shared(over))
    ms = lambda x: fmt_bar(x and x * 1000, ".1f")  # noqa: E731
    first, bound = over.get("first_piece_p50_s"), over.get("first_piece_bound_s")
    first_bar = Bar(
        "stream_first_piece", f"{over.get('name', 'stream_overhead')}: first streamed piece at batch 1 within "
        f"{FIRST_PIECE_DECODE_STEPS} decode steps of the prefill: its time vs the max_tokens=1 request's latency + "
        f"{FIRST_PIECE_DECODE_STEPS} × the streamed time per token",
        f"{ms(first)} ms vs {ms(over.get('one_token_p50_s'))} + {FIRST_PIECE_DECODE_STEPS} × "
        f"{fmt_bar(over.get('per_token_p50_s') and over['per_token_p50_s'] * 1000, '.2f')} = {ms(bound)} ms",
        "≤ that sum", False if _failed(over) else None if first is None or bound is None else first <= bound,
        shared=shared(over))
    return [hol_bar, uneven_bar, overhead_bar, first_bar]


def compute_bars(backend: str, scenarios: dict, baselines: dict, service: dict,
                 streams: dict | None = None, preset: str = "full", shape: str | None = None) -> tuple[list[Bar], dict]:
    """The bars of one backend's phase, each with the number it rests on.

    litert-int8 carries issue 7's bars (plus the sampling and compile bars kept from the
    first benchmark) and issue 8's streaming bars (`streams`: the phase's stream_scenarios);
    litert-fp32 the single-client bar; tf the earlier bars unchanged. The llama preset has its
    own (`llama_bars`).
    """
    if preset == "llama":
        return llama_bars(backend, scenarios, baselines, service, shape)
    ratios = compute_ratios(scenarios, baselines)
    by_role = {s["role"]: s for s in scenarios.values()}
    name = lambda role: by_role.get(role, {}).get("name", role)  # noqa: E731
    new = lambda role: by_role.get(role, {}).get("max_tokens", "?")  # noqa: E731
    over = by_role.get("overload", {})
    over_ok = None if not over else (over["errors"] == 0 and over["latency_p95_s"] is not None)
    sc, sb = ratios["sampling_cost_single"], ratios["sampling_cost_batch"]
    sampling_holds = None if sc is None or sb is None else (sc <= 1.15 and sb <= 1.15)
    compiles = service.get("compiles_after_warmup")
    warmup = service.get("warmup_seconds")

    def shared(*parts) -> bool:
        """Whether any of these scenario roles or baseline keys ('pt:...') ran beside other work."""
        cpus = [(baselines.get(p) if ":" in p else by_role.get(p)) or {} for p in parts]
        return any(((c.get("cpu") or {}).get("other_cores") or 0) > SHARED_CORES for c in cpus)

    def vs(rid, text, target):
        r = ratios[rid]
        return Bar(rid, text, fmt_bar(r, ".2f", "×"), f"≥ {target}×", _at_least(r, target),
                   shared=shared(*RATIO_PARTS.get(rid, ())))

    overload_bars = [
        Bar("overload_errors", f"{name('overload')}: no error but intended 503s; p95 reported",
            f"{over.get('errors', 'n/a')} errors, {over.get('responses_503', 'n/a')} 503s, "
            f"p95 {fmt_bar(over.get('latency_p95_s'), '.2f', ' s')}", "0 errors", over_ok),
        vs("overload_vs_batch", f"{name('overload')}: total tok/s vs {name('batch')}", 1.0),
    ]
    sampling_bar = Bar("sampling_cost", f"sampling (T={by_role.get('batch_sampled', {}).get('temperature')}) vs "
                       "greedy: time per token, 1 client and batch",
                       f"{fmt_bar(sc, '.3f', '×')} / {fmt_bar(sb, '.3f', '×')}", "≤ 1.15×", sampling_holds,
                       shared=shared(*RATIO_PARTS["sampling_cost"]))
    compiles_bar = Bar("compiles_after_warmup", "llm_compiles_after_warmup_total at the end",
                       fmt_bar(compiles, ".0f"), "= 0", None if compiles is None else compiles == 0)
    if backend == "litert-int8":
        # The peak from process start through the 32 clients (the long-context scenarios run after).
        peak = over.get("vmhwm_since_start_mib")
        peak_end = service.get("vmhwm_since_start_mib")
        window_peak = by_role.get("window", {}).get("vmhwm_since_start_mib")
        bars = [
            vs("single_vs_torch_b1", f"{name('single')}: tok/s vs PyTorch generate, batch 1", 3.0),
            vs("batch_vs_torch_b8", f"{name('batch')} (mixed prompts): total tok/s vs PyTorch batch 8", 2.0),
            vs("same_vs_torch_b8", f"{name('same')} (8 identical copies of the short prompt): total tok/s vs "
               "PyTorch batch 8 on them", 2.0),
            vs("long_single_vs_torch_b1", f"{name('long_single')} (long prompts, {new('long_single')} new): tok/s "
               "vs PyTorch batch 1", 2.0),
            vs("long_batch_vs_torch_b8", f"{name('long_batch')} (long prompts, {new('long_batch')} new): total "
               "tok/s vs PyTorch batch 8", 1.5),
            *overload_bars,
            Bar("peak_rss", f"server peak RSS (VmHWM) from process start through {name('overload')}, warm-up "
                "included",
                f"{fmt_bar(peak, '.0f', ' MiB')} (after the long-context scenarios: {fmt_bar(peak_end, '.0f', ' MiB')})",
                f"≤ 400 MB ({PEAK_RSS_LIMIT_LITERT_MIB:.0f} MiB)",
                _at_most(peak, PEAK_RSS_LIMIT_LITERT_MIB)),
            Bar("window_peak_rss", f"server peak RSS (VmHWM) from process start through {name('window')} "
                f"(8 rows filling the context window: mixed prompts, {new('window')} new tokens each), warm-up "
                "included", fmt_bar(window_peak, ".0f", " MiB"),
                f"≤ {WINDOW_RSS_LIMIT_MIB} MiB (the default container limit)",
                _at_most(window_peak, WINDOW_RSS_LIMIT_MIB)),
            Bar("warmup", "warm-up: process start to /health ok", fmt_bar(warmup, ".1f", " s"),
                f"≤ {WARMUP_LIMIT_LITERT_S:.0f} s", _at_most(warmup, WARMUP_LIMIT_LITERT_S)),
            sampling_bar,
            Bar("filtering_cost_batch", f"{name('batch_filtered')} (top_k {by_role.get('batch_filtered', {}).get('top_k')}, "
                f"top_p {by_role.get('batch_filtered', {}).get('top_p')}) vs {name('batch_sampled')}: time per token "
                "at batch 8", fmt_bar(ratios["filtering_cost_batch"], ".3f", "×"), "≤ 1.15×",
                _at_most(ratios["filtering_cost_batch"], 1.15), shared=shared(*RATIO_PARTS["filtering_cost_batch"])),
            Bar("nucleus_cost_batch", f"{name('batch_nucleus')} (top_p {by_role.get('batch_nucleus', {}).get('top_p')} "
                f"alone) vs {name('batch_sampled')}: time per token at batch 8",
                fmt_bar(ratios["nucleus_cost_batch"], ".3f", "×"), "≤ 1.15×",
                _at_most(ratios["nucleus_cost_batch"], 1.15), shared=shared(*RATIO_PARTS["nucleus_cost_batch"])),
            compiles_bar,
            *stream_bars(streams or {}, lambda *parts: any(
                ((p.get("cpu") or {}).get("other_cores") or 0) > SHARED_CORES for p in parts)),
        ]
    elif backend == "litert-fp32":
        bars = [vs("single_vs_torch_b1", f"{name('single')}: tok/s vs PyTorch generate, batch 1", 1.0)]
    else:
        peak = over.get("vmhwm_mib")
        peak_where = "under that load" if over.get("vmhwm_is_scenario_peak") else "since start"
        peak_all = service.get("vmhwm_since_start_mib")
        bars = [
            vs("single_vs_torch_b1", f"{name('single')}: tok/s vs PyTorch generate, batch 1", 1.0),
            vs("batch_vs_torch_b8", f"{name('batch')}: total tok/s vs PyTorch generate, batch 8", 1.2),
            Bar("batch_vs_naive_tf", f"{name('batch')}: total tok/s vs naive TF eager generate, one at a time",
                fmt_bar(ratios["batch_vs_naive_tf"], ".1f", "×"), "≥ 15×", _at_least(ratios["batch_vs_naive_tf"], 15.0),
                shared=shared(*RATIO_PARTS["batch_vs_naive_tf"])),
            *overload_bars,
            sampling_bar,
            Bar("peak_rss", f"server peak RSS (VmHWM) during {name('overload')}",
                f"{fmt_bar(peak, '.0f', ' MiB')} {peak_where} ({fmt_bar(peak_all, '.0f', ' MiB')} since start, "
                "warm-up included)", f"≤ 1.5 GB ({PEAK_RSS_LIMIT_MIB:.0f} MiB)", _at_most(peak, PEAK_RSS_LIMIT_MIB)),
            Bar("warmup", "warm-up: process start to /health ok", fmt_bar(warmup, ".1f", " s"),
                f"≤ {WARMUP_LIMIT_S:.0f} s", _at_most(warmup, WARMUP_LIMIT_S)),
            compiles_bar,
        ]
    for bar in bars:
        bar.phase = backend
    return bars, ratios


def llama_bars(backend: str, scenarios: dict, baselines: dict, service: dict, shape: str | None) -> tuple[list[Bar], dict]:
    """The llama preset's bars: LiteRT int8 at 1 client vs PyTorch batch 1 and at 8 clients vs
    PyTorch batch 8, with the targets LLAMA_BARS sets for `shape` (a shape without targets gets
    the ratios with no bar: holds None), and no compile after warm-up. Other backends: none
    (their ratios are in the report's text)."""
    ratios = compute_ratios(scenarios, baselines)
    if backend != "litert-int8":
        return [], ratios
    by_role = {s["role"]: s for s in scenarios.values()}
    name = lambda role: by_role.get(role, {}).get("name", role)  # noqa: E731
    targets = LLAMA_BARS.get(shape or "", {})

    def shared(*parts) -> bool:
        cpus = [(baselines.get(p) if ":" in p else by_role.get(p)) or {} for p in parts]
        return any(((c.get("cpu") or {}).get("other_cores") or 0) > SHARED_CORES for c in cpus)

    def vs(rid, text):
        r, target = ratios[rid], targets.get(rid)
        if target is None:
            known = "; ".join(f"{k}: ≥ {v[rid]}×" for k, v in LLAMA_BARS.items() if rid in v)
            return Bar(rid, text, fmt_bar(r, ".2f", "×"), f"none for {shape} ({known})", None,
                       shared=shared(*RATIO_PARTS[rid]))
        return Bar(rid, text, fmt_bar(r, ".2f", "×"), f"≥ {target}×", _at_least(r, target),
                   shared=shared(*RATIO_PARTS[rid]))

    compiles = service.get("compiles_after_warmup")
    bars = [
        vs("single_vs_torch_b1", f"{shape}: {name('single')} (the short prompt): tok/s vs PyTorch generate, batch 1"),
        vs("batch_vs_torch_b8", f"{shape}: {name('batch')} (mixed prompts): total tok/s vs PyTorch generate, batch 8"),
        Bar("compiles_after_warmup", "llm_compiles_after_warmup_total at the end", fmt_bar(compiles, ".0f"), "= 0",
            None if compiles is None else compiles == 0),
    ]
    for bar in bars:
        bar.phase = backend
    return bars, ratios


# Which baseline run does the same work as each scenario role (same prompts, same token budget):
# the first of these the run has (the llama preset times the mixed prompts at batch 8 alone).
SAME_WORK = {"single": ("short_b1",), "batch": ("mixed_b1", "mixed_b8"), "overload": ("mixed_b1",),
             "same": ("same_b8",), "long_single": ("long_b1",), "long_batch": ("long_b8",)}


def consistency_checks(scenarios: dict, baselines: dict, service_texts: dict) -> dict:
    """Do the service and the baselines do the same work? Token counts and greedy texts."""
    tokens = []
    for s in scenarios.values():
        for fw in ("tf", "pt"):
            run = next((r for r in SAME_WORK.get(s["role"], ()) if f"{fw}:{r}" in baselines), None)
            b = baselines.get(f"{fw}:{run}")
            if run and b and s.get("tokens_per_request") is not None:
                tokens.append({
                    "scenario": s["name"], "baseline": f"{fw}:{run}",
                    "service_tokens_per_request": s["tokens_per_request"],
                    "baseline_tokens_per_request": b["tokens_per_request"],
                    "equal": abs(s["tokens_per_request"] - b["tokens_per_request"]) < 1e-9,
                })
    texts = {}
    for fw in ("tf", "pt"):
        ref = {}
        for key, b in baselines.items():
            if key.startswith(fw + ":"):
                ref.update(b.get("texts", {}))
        compared = [p for p in service_texts if p in ref]
        if compared:
            same = sum(service_texts[p] == ref[p] for p in compared)
            texts[fw] = {"prompts": len(compared), "identical": same}
    return {"token_counts": tokens, "greedy_texts": texts}


# The PyTorch ratio of each scenario role (compute_ratios' names), shown beside the peers' ratios.
TORCH_RATIO_BY_ROLE = {"single": "single_vs_torch_b1", "batch": "batch_vs_torch_b8", "same": "same_vs_torch_b8",
                       "long_single": "long_single_vs_torch_b1", "long_batch": "long_batch_vs_torch_b8"}


def _single(seen: dict) -> dict:
    """{prompt: value} for the prompts whose requests all got one value."""
    return {p: next(iter(v)) for p, v in seen.items() if len(v) == 1}


def peer_checks(ours: dict, peer: dict) -> dict:
    """Did a peer phase do the service phase's work? Each side's count of every prompt's tokens
    (from its final events); the greedy texts are informational (other kernels, other rounding,
    and q8_0 is not the service's int8). `ours` and `peer` hold "texts" and "prompt_tokens", each
    {prompt: set of what its requests got}."""
    ours_n, peer_n = _single(ours["prompt_tokens"]), _single(peer["prompt_tokens"])
    both = [p for p in ours_n if p in peer_n]
    differ = [{"prompt": p[:40], "service": ours_n[p], "peer": peer_n[p]} for p in both if ours_n[p] != peer_n[p]]
    ours_t, peer_t = _single(ours["texts"]), _single(peer["texts"])
    texts = [p for p in ours_t if p in peer_t]
    return {"prompt_tokens": {"prompts": len(both), "equal": len(both) - len(differ), "differ": differ[:5]},
            "greedy_texts": {"prompts": len(texts), "identical": sum(ours_t[p] == peer_t[p] for p in texts)},
            "peer_greedy_deterministic": {"prompts": len(peer["texts"]),
                                          "same_text_every_request": sum(len(t) == 1 for t in peer["texts"].values())}}


def _shared_cpu(*measurements: dict) -> bool:
    return any(((m.get("cpu") or {}).get("other_cores") or 0) > SHARED_CORES for m in measurements)


def peer_comparison(result: dict) -> list[dict]:
    """Per service backend, peer phase and scenario both ran: the two throughputs and peak RSS
    (each server's VmHWM over that scenario, read alike) with their ratios, the service's ÷ the
    peer's, beside the service's ratio to PyTorch on the same work where the run has one."""
    rows = []
    for peer in (result.get("peers") or {}).values():
        for pname, pphase in peer.get("phases", {}).items():
            for backend in pphase.get("compared_with", []):
                phase = (result.get("phases") or {}).get(backend)
                if phase is None:
                    continue
                for sname, ours in phase["scenarios"].items():
                    theirs = pphase["scenarios"].get(sname)
                    if theirs is None:
                        continue
                    tpr, peer_tpr = ours.get("tokens_per_request"), theirs.get("tokens_per_request")
                    rows.append({
                        "backend": backend, "peer": pname, "scenario": sname, "role": ours["role"],
                        "tok_per_s": ours.get("tok_per_s"), "peer_tok_per_s": theirs.get("tok_per_s"),
                        "tok_per_s_ratio": _ratio(ours.get("tok_per_s"), theirs.get("tok_per_s")),
                        "vs_torch": (phase.get("ratios") or {}).get(TORCH_RATIO_BY_ROLE.get(ours["role"], "")),
                        "vmhwm_mib": ours.get("vmhwm_mib"), "peer_vmhwm_mib": theirs.get("vmhwm_mib"),
                        "rss_ratio": _ratio(ours.get("vmhwm_mib"), theirs.get("vmhwm_mib")),
                        "tokens_per_request": tpr, "peer_tokens_per_request": peer_tpr,
                        "same_tokens": None if tpr is None or peer_tpr is None else abs(tpr - peer_tpr) < 1e-9,
                        "errors": ours.get("errors", 0) + theirs.get("errors", 0),
                        "shared": _shared_cpu(ours, theirs),
                    })
    return rows


def _peer_section(result: dict) -> list[str]:
    """The peers beside the service: how each was run, one table of ratios per scenario, the
    checks that they did the same work, and each peer phase's own scenario table."""
    lines = []
    rows = result.get("peer_comparison") or []
    for peer in (result.get("peers") or {}).values():
        st = peer.get("settings") or {}
        lines += ["", f"Peer: llama.cpp's llama-server ({peer.get('version')}; llama.cpp {peer.get('llama_cpp_commit')} "
                  f"as llama-cpp-python {peer.get('llama_cpp_python')} vendors it), built in the cache for this CPU "
                  f"(GGML_NATIVE), run as `-t {st.get('threads')} --parallel {st.get('parallel')} -c {st.get('context')}` "
                  f"({st.get('slot_context')} tokens a slot) `--cache-ram 0`. Each scenario's requests went to "
                  "/completion, streamed, with the service's prompts, max_tokens, temperature, top_k, top_p and seeds, "
                  "min_p 0, ignore_eos and cache_prompt false, from the same load generator. Ratios are the service's "
                  "÷ llama.cpp's: tok/s above 1× means the service is faster; peak RSS (each server's VmHWM over the "
                  "scenario, read alike from /proc) below 1× means the service held less. The streaming scenarios "
                  "(issue 8) are the service's alone."]
        for name, p in peer.get("phases", {}).items():
            g, sv = p.get("gguf") or {}, p.get("service") or {}
            ours = [f"{b} {fmt((result['phases'].get(b) or {}).get('service', {}).get('vmhwm_since_start_mib'), '.0f')} MiB"
                    for b in p.get("compared_with", []) if b in result["phases"]]
            lines.append(f"**{name}** beside {', '.join(p.get('compared_with', []))}: {fmt(g.get('mib'))} MiB "
                         f"GGUF" + (f" (converted this run in {g['convert_seconds']:.0f} s)" if g.get("convert_seconds")
                                    else "") + f"; warm-up {fmt(sv.get('warmup_seconds'))} s; peak RSS since start "
                         f"{fmt(sv.get('vmhwm_since_start_mib'), '.0f')} MiB (the service's: {', '.join(ours)}).")
    if rows:
        lines += ["", "| service backend vs peer | scenario | service tok/s | llama.cpp tok/s | ratio | service vs PyTorch "
                  "| service peak RSS MiB | llama.cpp peak RSS MiB | RSS ratio | new tokens per request (service / llama.cpp) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            same = "" if r["same_tokens"] in (None, True) else " **differ**"
            notes = (" (shared: unreliable)" if r["shared"] else "") + (f" ({r['errors']} errors)" if r["errors"] else "")
            lines.append(f"| {r['backend']} vs {r['peer']} | {r['scenario']} | {fmt(r['tok_per_s'])} | "
                         f"{fmt(r['peer_tok_per_s'])} | **{fmt(r['tok_per_s_ratio'], '.2f')}×**{notes} | "
                         f"{fmt(r['vs_torch'], '.2f') + '×' if r['vs_torch'] is not None else '–'} | "
                         f"{fmt(r['vmhwm_mib'], '.0f')} | {fmt(r['peer_vmhwm_mib'], '.0f')} | "
                         f"{fmt(r['rss_ratio'], '.2f')}× | {fmt(r['tokens_per_request'], '.1f')} / "
                         f"{fmt(r['peer_tokens_per_request'], '.1f')}{same} |")
    for peer in (result.get("peers") or {}).values():
        for name, p in peer.get("phases", {}).items():
            for backend, c in (p.get("checks") or {}).items():
                pt, gt, det = c["prompt_tokens"], c["greedy_texts"], c.get("peer_greedy_deterministic") or {}
                lines.append(f"{backend} vs {name}: prompt tokens counted alike for {pt['equal']} of {pt['prompts']} prompts"
                             + (f" (**differ**: {pt['differ']})" if pt["differ"] else "")
                             + f"; greedy texts identical for {gt['identical']} of {gt['prompts']} prompts that got one "
                             "text on both sides (informational: other kernels"
                             + (", q8_0 is not int8" if p.get("weights") == "q8_0" else "") + "); llama.cpp gave "
                             f"{det.get('same_text_every_request')} of {det.get('prompts')} prompts one greedy text in "
                             "every request.")
        for name, p in peer.get("phases", {}).items():
            lines += ["", f"{p['title']} ({name}):", ""] + _scenario_table(p)
    return lines


def fmt(x, spec=".1f"):
    return "–" if x is None else f"{x:{spec}}"


def _scenario_table(phase: dict) -> list[str]:
    lines = [
        "| scenario | clients | requests | new tokens | tok/s | req/s | p50 s | p95 s | TTFT p50 / p95 ms "
        "| TPOT p50 / p95 ms | 503s | errors | peak RSS MiB | rows/call | cores: ours / others |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in phase["scenarios"].values():
        lines.append(
            f"| {s['name']} (T={s['temperature']}, {s['max_tokens']} new) | {s['clients']} | {s['ok']}/{s['requests']} | "
            f"{fmt(s['new_tokens'], 'd') if s['new_tokens'] is not None else '–'} | {fmt(s['tok_per_s'])} | "
            f"{fmt(s['req_per_s'], '.2f')} | {fmt(s['latency_p50_s'], '.2f')} | {fmt(s['latency_p95_s'], '.2f')} | "
            f"{_ms_pair(s, 'ttft')} | {_ms_pair(s, 'tpot')} | "
            f"{s['responses_503']} | {s['errors']} | {fmt(s['vmhwm_mib'], '.0f')} | "
            f"{fmt(s.get('rows_per_call'), '.1f')} | {_cores(s.get('cpu'))} |"
        )
    return lines


def _ms_pair(s: dict, key: str) -> str:
    """A scenario's `<key>_p50_s` and `<key>_p95_s` in milliseconds ("–" for a result without them)."""
    ms = [s.get(f"{key}_{q}_s") for q in ("p50", "p95")]
    return " / ".join(fmt(x and x * 1000, ".1f") for x in ms)


PLOT_CAPTIONS = {
    "throughput": "Total new tokens/s against concurrent clients, per backend and baseline",
    "latency": "Time to first token and time per output token, median and p95, per scenario and backend",
    "soak-rss": "Resident memory of the service over the soak, the counted window shaded",
}


def plot_links(result: dict) -> list[str]:
    """Markdown image links to the plots beside result.md (relative: they sit in the same folder)."""
    lines = []
    for name in result.get("plots") or []:
        caption = PLOT_CAPTIONS.get(Path(name).stem, Path(name).stem)
        lines += ["", f"![{caption}]({name})"]
    return lines


def _stream_figures(s: dict) -> str:
    """What one streaming measurement found, in a sentence."""
    server = s.get("server") or {}

    def hist(key: str) -> str:
        h = server.get(key) or {}
        return "–" if h.get("count") is None else f"{fmt(h.get('p50_s'), '.3f')}/{fmt(h.get('p95_s'), '.3f')} s"

    if s.get("role") == "head_of_line":
        rounds = s.get("rounds") or []
        return (f"short request p50 idle {fmt(s.get('idle_latency_p50_s'), '.3f')} s, under load "
                f"{fmt(s.get('loaded_latency_p50_s'), '.3f')} s, worst {fmt(s.get('loaded_latency_max_s'), '.3f')} s "
                "(rounds: "
                + ", ".join(f"{r['loaded_requests']} short requests under load, first sent "
                            f"{fmt(r['decoding_after_s'], '.2f')} s after the long requests" for r in rounds)
                + f"); long requests {fmt(s.get('long_tok_per_s'))} tok/s, first piece p50 "
                f"{fmt(s.get('long_first_piece_p50_s'), '.3f')} s; server TTFT p50/p95 {hist('ttft')}"
                + _lane(s))
    if s.get("role") == "stream_overhead":
        per_token = s.get("per_token_p50_s")
        return (f"unstreamed {fmt(s.get('unstreamed_p50_s'), '.3f')} s, streamed "
                f"{fmt(s.get('streamed_p50_s'), '.3f')} s, first piece {fmt(s.get('first_piece_p50_s'), '.4f')} s, "
                f"max_tokens=1 {fmt(s.get('one_token_p50_s'), '.4f')} s, {fmt(per_token and per_token * 1000, '.2f')} "
                f"ms/token streamed; pieces per streamed request {s.get('streamed_pieces')}")
    return (f"{fmt(s.get('tok_per_s'))} tok/s over {fmt(s.get('wall_seconds'))} s (think times "
            f"{fmt(s.get('think_seconds_total'))} s in all, {s.get('max_tokens_total')} tokens asked); client TTFT "
            f"p50/p95 {fmt(s.get('ttft_p50_s'), '.3f')}/{fmt(s.get('ttft_p95_s'), '.3f')} s, latency p50/p95 "
            f"{fmt(s.get('latency_p50_s'), '.2f')}/{fmt(s.get('latency_p95_s'), '.2f')} s; server TTFT p50/p95 "
            f"{hist('ttft')}, queue wait {hist('queue_wait')}, time per token {hist('tpot')}" + _lane(s))


def _lane(s: dict) -> str:
    """The short lane's share of a measurement (LiteRT), from /metrics."""
    if s.get("short_lane_rows") is None:
        return ""
    return f"; short lane: {s['short_lane_rows']} rows, {s.get('short_lane_calls')} calls"


def _stream_table(phase: dict) -> list[str]:
    lines = ["| scenario | requests | new tokens (events / /metrics) | figures | 503s | errors "
             "| cores: ours / others |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, s in stream_measurements(phase["stream_scenarios"]):
        server = s.get("new_tokens_server")
        tokens = (f"{s['new_tokens']} / " if s.get("new_tokens") is not None else "") + (
            "–" if server is None else str(server))
        lines.append(f"| {name} | {s.get('requests')} | {tokens} | "
                     f"{_stream_figures(s)} | {s.get('responses_503', 0)} | {s.get('errors', 0)}"
                     + (f" ({'; '.join(dict.fromkeys(e[:120] for e in s['error_samples']))})"
                        if s.get("error_samples") else "")
                     + f" | {_cores(s.get('cpu'))} |")
    return lines


def _served(phase: dict) -> str:
    h = phase.get("health") or {}
    info = phase.get("backend_info") or []
    said = ", ".join(f"{k}={v}" for k, v in h.items() if k != "status") or "no backend field"
    metric = "; ".join(",".join(f'{k}="{v}"' for k, v in i.items()) for i in info) or "none"
    return f"/health said {said} (llm_backend_info: {metric})"


def markdown(result: dict) -> str:
    m, preset = result["machine"], result["preset"]
    phases = result["phases"]
    revision = result.get("revision", {})
    litert = result.get("litert") or {}
    lines = [
        f"# Benchmark result ({preset}, {result['started_at']})",
        "",
        f"Command: `{result.get('command', './bench/run.sh')}`. "
        f"Service at commit {revision.get('commit')}"
        + (" with uncommitted changes in service/" if revision.get("service_dirty") else "") + ".",
        f"Machine: {m['cpu_model']}, {m['cores']} cores ({m['cores_usable']} usable), {m['memory_gib']} GiB, "
        f"Linux {m['kernel']} {m['machine']}; load average (1/5/15 min) {result['load_before']} before, "
        f"{result['load_after']} after; 1-min load as each phase began: "
        + ", ".join(f"{k} {v}" for k, v in result.get("load_at_phase_start", {}).items()) + ".",
        f"Model: {result['model']['shape']} ({result['model']['summary']}), "
        + (f"random weights ({result['model']['weights']} on disk), " if result["model"].get("weights")
           else "random fp32 weights, ") +
        f"`{result['model']['dir']}`. {result['max_tokens']} new tokens per request"
        + (", greedy." if preset == "llama" else
           f" ({result.get('long_max_tokens')} in the long-context scenarios); sampled scenarios use "
           f"T={result['temperature']} with a seed per request."),
    ]
    if litert:
        gate = litert.get("gate") or {}
        lines.append(
            f"LiteRT files: `scripts/convert_model.py --model-dir` took {fmt(litert.get('seconds'))} s"
            + (f"; its int8 gate decided {gate.get('decision')!r}" if gate.get("decision") is not None else "")
            + (f" ({gate.get('summary')})" if gate.get("summary") else "") + ".")
    lines.append("Each backend ran in its own phase, started cold: " + "; ".join(
        f"**{name}** ({_served(p)}; warm-up {fmt(p['service'].get('warmup_seconds'))} s; "
        f"peak RSS since start {fmt(p['service'].get('vmhwm_since_start_mib'), '.0f')} MiB; "
        f"environment {p['service'].get('env') or 'defaults'})" for name, p in phases.items()) + ".")
    lines += ["", "| backend | bar | measured | target | holds |", "| --- | --- | --- | --- | --- |"]
    for name, phase in phases.items():
        for bar in phase["bars"]:
            holds = {True: "yes", False: "**no**", None: "n/a"}[bar["holds"]]
            if bar.get("shared"):
                holds += " (shared: unreliable)"
            lines.append(f"| {name} | {bar['text']} | {bar['measured']} | {bar['target']} | {holds} |")
    if preset == "llama":
        lines += [""] + _llama_summary(result)
    lines += plot_links(result)
    for name, phase in phases.items():
        lines += ["", f"{phase['title']}:", ""] + _scenario_table(phase)
        if phase.get("stream_scenarios"):
            lines += ["", f"{phase['title']}, streaming scenarios (issue 8):", ""] + _stream_table(phase)
    lines += _peer_section(result)
    every_reset = all(s.get("vmhwm_is_scenario_peak") for p in phases.values() for s in p["scenarios"].values())
    lines += ["", "Peak RSS per scenario is the server's VmHWM " + (
        "over that scenario alone (reset through /proc/PID/clear_refs before it); the peak since start "
        "is the largest reading before any reset and of every scenario."
        if every_reset else "since it started (the reset through /proc/PID/clear_refs was refused).")]
    lines += [
        "",
        "| baseline (greedy, same prompts and model files) | batch | requests | new tokens | tok/s | req/s | p50 s "
        "| cores: ours / others |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    names = {"tf": "naive: TF eager `generate`", "pt": "PyTorch CPU `generate`"}
    for b in result["baselines"].values():
        lines.append(
            f"| {names[b['framework']]}, {b['name']} ({b['max_new_tokens']} new) | {b['batch_size']} | {b['requests']} | "
            f"{b['new_tokens']} | {fmt(b['tok_per_s'])} | {fmt(b['req_per_s'], '.2f')} | "
            f"{fmt(b['latency_p50_s'], '.2f')} | {_cores(b.get('cpu'))} |"
        )
    again = [f"{name} {s['name']} ({s['attempts']})" for name, p in phases.items() for s in p["scenarios"].values()
             if s.get("attempts", 1) > 1]
    again += [f"{name} {part} ({s['attempts']})" for name, p in phases.items()
              for part, s in stream_measurements(p.get("stream_scenarios") or {}) if s.get("attempts", 1) > 1]
    again += [f"{name} {s['name']} ({s['attempts']})" for name, p in _peer_phases(result).items()
              for s in p["scenarios"].values() if s.get("attempts", 1) > 1]
    again += [f"baseline {key} ({b['attempts']})" for key, b in result["baselines"].items() if b.get("attempts", 1) > 1]
    if again:
        lines += ["", "Measured more than once because other processes used the CPU (attempts; the least shared one "
                  "counts): " + ", ".join(again) + "."]
    shared = shared_phases(result)
    measured = any((s.get("cpu") or {}).get("other_cores") is not None
                   for p in phases.values() for s in p["scenarios"].values())
    lines.append("")
    lines.append(
        "The CPU use of other processes was not recorded in this run." if not measured else
        "Every phase had the machine to itself (other processes used under "
        f"{SHARED_CORES} cores)." if not shared else
        "**Shared machine**: other processes used CPU during " + ", ".join(
            f"{name} ({cores:.2f} cores)" for name, cores in shared)
        + "; the ratios that rest on these phases are not reliable.")
    lines.append("")
    if result.get("torch"):
        t = result["torch"]
        lc = t.get("logits_check") or {}
        if lc.get("skipped"):
            loaded = f"weights loaded as float32; logits not checked ({lc['skipped']})"
        elif lc.get("reference", "TensorFlow's") == "TensorFlow's":
            loaded = (f"weights converted from tf_model.h5; logits equal to TensorFlow's within "
                      f"{fmt(lc.get('max_abs_diff'), '.1e')} (same argmax: {lc.get('same_argmax')})")
        else:
            loaded = (f"`AutoModelForCausalLM` on the model's own safetensors, loaded as float32; logits equal to "
                      f"those bench/make_model.py recorded for the model it saved within "
                      f"{fmt(lc.get('max_abs_diff'), '.1e')} (same argmax: {lc.get('same_argmax')})")
        lines.append(
            f"PyTorch side: torch {t.get('torch')} (CPU build, {t.get('threads')} threads), {loaded}"
            + (f"; the worker's peak RSS {t['peak_rss_mib']:.0f} MiB" if t.get("peak_rss_mib") else "") + ". "
            + (f"Venv created this run in {t['install_seconds']:.0f} s." if t.get("created") else "Venv reused.")
        )
    else:
        lines.append("PyTorch baseline skipped (--no-torch): its bars read n/a.")
    eos = sum(b["eos_stops"] for b in result["baselines"].values())
    for name, phase in phases.items():
        checks = phase["checks"]
        counts = checks["token_counts"]
        if counts:
            lines.append(
                f"{name}: new tokens per request vs baselines "
                + ("equal everywhere" if all(c["equal"] for c in counts) else "**differ**: " + ", ".join(
                    f"{c['scenario']} {c['service_tokens_per_request']:.2f} vs {c['baseline']} "
                    f"{c['baseline_tokens_per_request']:.2f}" for c in counts if not c["equal"]))
                + f" (end-of-text stops in baselines: {eos}).")
        expect = "must be" if phase.get("exact_text") else "not expected for int8 weights; informational"
        for fw, t in checks["greedy_texts"].items():
            lines.append(f"{name}: greedy texts identical to {names[fw]}: {t['identical']} of {t['prompts']} prompts "
                         f"({expect}).")
        det = checks.get("greedy_deterministic") or {}
        if det:
            lines.append(f"{name}: each prompt got one greedy text in every request, whatever its batch: "
                         f"{det['same_text_every_request']} of {det['prompts']} prompts.")
        r = phase["ratios"]
        if preset == "llama":
            lines.append(f"{name}: greedy_c1 vs PyTorch batch 1 {fmt(r.get('single_vs_torch_b1'), '.2f')}×, "
                         f"greedy_c8 vs PyTorch batch 8 {fmt(r.get('batch_vs_torch_b8'), '.2f')}×.")
            continue
        lines.append(
            f"{name}, other ratios: single vs naive TF {fmt(r.get('single_vs_naive_tf'), '.1f')}×, "
            f"{'mixed c8 vs PyTorch batch 8 ' + fmt(r.get('batch_vs_torch_b8'), '.2f') + '×, ' if name == 'litert-fp32' else ''}"
            f"mixed c8 vs PyTorch batch 1 {fmt(r.get('batch_vs_torch_b1'), '.2f')}×.")
    ratios = next(iter(phases.values()))["ratios"] if phases else {}
    if preset != "llama":  # it times neither the mixed prompts at batch 1 nor naive TF
        lines.append(f"Baselines: PyTorch batch 8 vs batch 1 {fmt(ratios.get('torch_b8_vs_b1'), '.2f')}×, "
                     f"PyTorch batch 8 vs naive TF {fmt(ratios.get('torch_b8_vs_naive_tf'), '.1f')}×.")
    for profile in result.get("profiles") or []:
        if profile.get("table"):
            lines += ["", profile["title"], "", *profile["table"], "", *profile.get("notes", [])]
        elif profile.get("error"):
            lines += ["", f"Per-op profile (cache {profile.get('cache')}) failed: {profile['error']}"]
    return "\n".join(lines) + "\n"


def _llama_summary(result: dict) -> list[str]:
    """The llama preset's figures in one table: tok/s at 1 and 8 clients per backend beside
    PyTorch at batch 1 and 8, the ratios, and peak memory."""
    pt = lambda key: (result["baselines"].get(key) or {}).get("tok_per_s")  # noqa: E731
    lines = ["| | 1 client (short prompt), tok/s | 8 clients (mixed prompts), tok/s | vs PyTorch batch 1 "
             "| vs PyTorch batch 8 | peak RSS MiB |", "| --- | --- | --- | --- | --- | --- |"]
    for name, phase in result["phases"].items():
        by_role = {s["role"]: s for s in phase["scenarios"].values()}
        r = phase["ratios"]
        lines.append(f"| service, {name} | {fmt((by_role.get('single') or {}).get('tok_per_s'))} | "
                     f"{fmt((by_role.get('batch') or {}).get('tok_per_s'))} | {fmt(r.get('single_vs_torch_b1'), '.2f')}× | "
                     f"{fmt(r.get('batch_vs_torch_b8'), '.2f')}× | "
                     f"{fmt(phase['service'].get('vmhwm_since_start_mib'), '.0f')} (server, since start) |")
    torch = result.get("torch") or {}
    lines.append(f"| PyTorch generate (fp32) | {fmt(pt('pt:short_b1'))} (batch 1) | {fmt(pt('pt:mixed_b8'))} (batch 8) "
                 f"| – | – | {fmt(torch.get('peak_rss_mib'), '.0f')} (worker) |")
    return lines


def _cores(cpu: dict | None) -> str:
    if not cpu or cpu.get("own_cores") is None:
        return "–"
    return f"{cpu['own_cores']:.2f} / {cpu['other_cores']:.2f}"


def shared_phases(result: dict) -> list[tuple[str, float]]:
    """Phases during which other processes used more than SHARED_CORES cores."""
    phases = []
    for name, p in result["phases"].items():
        phases.append((f"{name} warm-up", p["service"].get("warmup_cpu") or {}))
        phases += [(f"{name} {sname}", s.get("cpu") or {}) for sname, s in p["scenarios"].items()]
        phases += [(f"{name} {part}", s.get("cpu") or {})
                   for part, s in stream_measurements(p.get("stream_scenarios") or {})]
    for name, p in _peer_phases(result).items():
        phases.append((f"{name} warm-up", p["service"].get("warmup_cpu") or {}))
        phases += [(f"{name} {sname}", s.get("cpu") or {}) for sname, s in p["scenarios"].items()]
    phases += [(f"baseline {key}", b.get("cpu") or {}) for key, b in result["baselines"].items()]
    return [(name, c["other_cores"]) for name, c in phases
            if c.get("other_cores") is not None and c["other_cores"] > SHARED_CORES]


def _peer_phases(result: dict) -> dict:
    """Every peer's phases by name (llamacpp-q8_0, ...)."""
    return {name: p for peer in (result.get("peers") or {}).values() for name, p in peer.get("phases", {}).items()}


def bars_as_dicts(bars: list[Bar]) -> list[dict]:
    return [asdict(b) for b in bars]


def rerender(result: dict) -> dict:
    """Bars and checks computed again from a result.json's measurements (for a report change)."""
    for name, phase in result["phases"].items():
        bars, ratios = compute_bars(name, phase["scenarios"], result["baselines"], phase["service"],
                                    phase.get("stream_scenarios"), result["preset"], result["model"].get("shape"))
        phase["bars"], phase["ratios"] = bars_as_dicts(bars), ratios
    result["bars"] = [bar for p in result["phases"].values() for bar in p["bars"]]
    result["peer_comparison"] = peer_comparison(result)
    return result


def save(result: dict, md: str, work: Path, results_dir: Path, latest: str) -> None:
    """result.json and result.md in the run's folder `work`, copied to `results_dir` as
    `<latest>.json` and `<latest>.md`; the plots `result["plots"]` names (already in `work`) are
    copied beside them under their own names, so the Markdown's relative links work in both."""
    results_dir.mkdir(parents=True, exist_ok=True)
    (work / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    (work / "result.md").write_text(md)
    for suffix in ("json", "md"):
        shutil.copyfile(work / f"result.{suffix}", results_dir / f"{latest}.{suffix}")
    for name in result.get("plots") or []:
        shutil.copyfile(work / name, results_dir / name)


if __name__ == "__main__":
    # python -m bench.report RESULT.json: rewrite its bars and print its Markdown again.
    import sys

    path = Path(sys.argv[1])
    data = rerender(json.loads(path.read_text()))
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(markdown(data), end="")
