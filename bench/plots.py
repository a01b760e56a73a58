"""The benchmark's figures, drawn from a result dict (result.json's shape) with matplotlib.

- `throughput.svg`: total new tokens/s against concurrent clients, one line per backend (its
  greedy_c1 / greedy_c8 / greedy_c32 scenarios), per peer phase (llama.cpp, dotted) and per
  baseline (PyTorch at batch 1 and 8, the naive TF baseline at batch 1: a baseline's batch
  stands where the clients would);
- `latency.svg`: time to first token and time per output token, median and p95, per scenario
  and backend;
- `soak-rss.svg`: the soak run's resident memory against time, its counted window marked.

Each `*_figure` function returns the matplotlib Figure (tests read its lines and legends); the
`write_*` functions save them beside result.md and return the file names.

    python -m bench.plots RESULT_DIR [--format png]   # draw them again from RESULT_DIR/result.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

# Files only, never a window: Agg renders the PNGs (and the SVG backend the SVGs) whatever the
# environment's MPLBACKEND says. Figures are built with matplotlib.figure.Figure, not pyplot,
# so no figure outlives its function in a global registry.
matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402  (after the backend is chosen)
from matplotlib.lines import Line2D  # noqa: E402
import math  # noqa: E402

from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator, ScalarFormatter  # noqa: E402

FORMATS = ("svg", "png")

# Text stays text in the SVG (small, searchable, crisp at any zoom); a fixed hash salt keeps
# its element ids the same from run to run, so re-drawing the same result gives the same file.
RC = {"svg.fonttype": "none", "svg.hashsalt": "bench", "font.size": 9, "axes.titlesize": 10,
      "legend.fontsize": 8, "axes.grid": True, "grid.alpha": 0.3}

BACKEND_COLORS = {"litert-int8": "tab:blue", "litert-fp32": "tab:orange", "tf": "tab:green"}
OTHER_COLORS = ("tab:purple", "tab:brown", "tab:pink", "tab:olive")

# The greedy scenarios on the mixed prompts (and the short prompt at 1 client): the throughput curve.
THROUGHPUT_ROLES = ("single", "batch", "overload")
# (label, colour, style, baseline keys): each key's batch size is its x.
BASELINE_SERIES = (
    ("PyTorch generate (x = batch size)", "black", "--", ("pt:short_b1", "pt:mixed_b8")),
    ("naive TF eager generate (batch 1)", "tab:red", ":", ("tf:short_b1",)),
)
LOG_SCALE_RANGE = 20.0  # a log axis once the largest value is this many times the smallest


def backend_color(name: str, index: int) -> str:
    return BACKEND_COLORS.get(name) or OTHER_COLORS[index % len(OTHER_COLORS)]


def _log_if_wide(values: list[float], ax, which: str) -> None:
    """A log scale on `ax`'s `which` ("x" or "y") axis when `values` span more than
    LOG_SCALE_RANGE, labelled in plain numbers at 1, 2 and 5 times each power of ten."""
    positive = [v for v in values if v and v > 0]
    if not positive or max(positive) / min(positive) <= LOG_SCALE_RANGE:
        return
    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if _leading_digit(v) in (2, 5) else ""))


def _leading_digit(v: float) -> int:
    return int(round(v / 10 ** math.floor(math.log10(v)))) if v > 0 else 0


def _machine_line(result: dict) -> str:
    m = result.get("machine") or {}
    return f"{m.get('cpu_model', 'unknown CPU')}, {m.get('cores', '?')} cores"


def _model_line(result: dict) -> str:
    model = result.get("model") or {}
    return f"{model.get('shape', '?')} model ({model.get('summary', '?')})"


def throughput_series(result: dict) -> list[tuple[str, str, str, list[tuple[int, float]]]]:
    """(label, colour, line style, [(clients or batch size, tok/s)]) per backend and baseline
    present in `result`; series without a point are left out."""
    series = []
    for i, (name, phase) in enumerate(result.get("phases", {}).items()):
        by_role = {s.get("role"): s for s in phase.get("scenarios", {}).values()}
        points = sorted((by_role[r]["clients"], by_role[r]["tok_per_s"]) for r in THROUGHPUT_ROLES
                        if r in by_role and by_role[r].get("tok_per_s") is not None)
        if points:
            series.append((f"service, {name}", backend_color(name, i), "-", points))
    # Peers (llama.cpp's llama-server, ...): dotted, in the colour of the service backend each is
    # compared with first (q8_0 beside litert-int8, f32 beside litert-fp32).
    names = list(result.get("phases", {}))
    for peer in (result.get("peers") or {}).values():
        for name, phase in peer.get("phases", {}).items():
            by_role = {s.get("role"): s for s in phase.get("scenarios", {}).values()}
            points = sorted((by_role[r]["clients"], by_role[r]["tok_per_s"]) for r in THROUGHPUT_ROLES
                            if r in by_role and by_role[r].get("tok_per_s") is not None)
            first = (phase.get("compared_with") or [name])[0]
            if points:
                series.append((f"peer, {name}", backend_color(first, names.index(first) if first in names else 0),
                               ":", points))
    baselines = result.get("baselines") or {}
    for label, color, style, keys in BASELINE_SERIES:
        points = sorted((baselines[k]["batch_size"], baselines[k]["tok_per_s"]) for k in keys
                        if k in baselines and baselines[k].get("tok_per_s") is not None)
        if points:
            series.append((label, color, style, points))
    return series


def throughput_figure(result: dict) -> Figure:
    """Total new tokens/s against concurrent clients (a baseline's batch size)."""
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(7.0, 4.6), layout="constrained")
        ax = fig.add_subplot()
        series = throughput_series(result)
        labelled: list[tuple[float, float]] = []
        for label, color, style, points in series:
            xs, ys = zip(*points)
            ax.plot(xs, ys, style, color=color, marker="o", label=label)
            for x, y in points:
                # A value next to each point, unless one at the same x is within 12%: there the
                # labels would overlap, and the tables hold every figure.
                if any(x == x0 and abs(math.log(y / y0)) < 0.12 for x0, y0 in labelled if y > 0 and y0 > 0):
                    continue
                labelled.append((x, y))
                ax.annotate(f"{y:.0f}", (x, y), textcoords="offset points", xytext=(6, 3), fontsize=7,
                            color=color)
        xs = sorted({x for *_, points in series for x, _ in points})
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(xs or [1]))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
        _log_if_wide([y for *_, points in series for _, y in points], ax, "y")
        if ax.get_yscale() == "linear":
            ax.set_ylim(bottom=0)
        if xs:
            ax.set_xlim(xs[0] / 1.4, xs[-1] * 1.4)
        ax.set_xlabel("concurrent clients (baselines: batch size)")
        ax.set_ylabel("new tokens/s, all clients together")
        ax.set_title(f"Throughput: {_model_line(result)}, {result.get('max_tokens', '?')} new tokens a request\n"
                     f"{_machine_line(result)}; {result.get('preset', '?')} preset, {result.get('started_at', '')}")
        if series:
            ax.legend(loc="best")
        else:
            ax.text(0.5, 0.5, "no greedy scenario or baseline in this result", ha="center", transform=ax.transAxes)
    return fig


LATENCY_PANELS = (("ttft", "time to first token (ms)"), ("tpot", "time per output token (ms)"))


def latency_rows(result: dict) -> list[str]:
    """Scenario names in the order they first appear across the phases."""
    names: dict[str, None] = {}
    for phase in result.get("phases", {}).values():
        names.update(dict.fromkeys(phase.get("scenarios", {})))
    return list(names)


def latency_figure(result: dict) -> Figure:
    """TTFT and TPOT per scenario, one panel each: a dot at the median and a whisker to p95,
    one colour per backend."""
    rows = latency_rows(result)
    phases = list(result.get("phases", {}).items())
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(9.0, 1.6 + 0.42 * max(len(rows), 1)), layout="constrained")
        axes = fig.subplots(1, len(LATENCY_PANELS), sharey=True)
        step = 0.7 / max(len(phases), 1)  # each backend's offset within a scenario's row
        for ax, (key, xlabel) in zip(axes, LATENCY_PANELS):
            values = []
            for i, (name, phase) in enumerate(phases):
                color = backend_color(name, i)
                for r, scenario in enumerate(rows):
                    s = phase.get("scenarios", {}).get(scenario) or {}
                    p50, p95 = s.get(f"{key}_p50_s"), s.get(f"{key}_p95_s")
                    if p50 is None:
                        continue
                    y = r + (i - (len(phases) - 1) / 2) * step
                    p50 *= 1000
                    ax.plot([p50], [y], "o", color=color, markersize=5)
                    if p95 is not None:
                        p95 *= 1000
                        ax.plot([p50, p95], [y, y], "-", color=color, linewidth=1.5)
                        ax.plot([p95], [y], "|", color=color, markersize=9, markeredgewidth=1.5)
                        values.append(p95)
                    values.append(p50)
            _log_if_wide(values, ax, "x")
            if ax.get_xscale() == "linear":
                ax.set_xlim(left=0, right=max(values, default=1) * 1.08)
            ax.set_xlabel(xlabel)
            if not values:
                ax.text(0.5, 0.5, f"no {key.upper()} in this result", ha="center", transform=ax.transAxes)
        axes[0].set_yticks(range(len(rows)), rows)
        axes[0].set_ylim(len(rows) - 0.5, -0.5)  # the first scenario on top, as in the tables
        for ax in axes:
            ax.grid(False, axis="y")
            for r in range(1, len(rows)):
                ax.axhline(r - 0.5, color="0.85", linewidth=0.6)
        handles = [Line2D([], [], color=backend_color(name, i), marker="o", label=name) for i, (name, _) in
                   enumerate(phases)]
        handles += [Line2D([], [], color="0.3", marker="o", linestyle="none", label="median"),
                    Line2D([], [], color="0.3", marker="|", markersize=9, label="p95 (whisker end)")]
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles))
        fig.suptitle(f"Per-request latency of the streamed load scenarios: {_model_line(result)}\n"
                     f"{_machine_line(result)}; {result.get('preset', '?')} preset, {result.get('started_at', '')}")
    return fig


def soak_rss_figure(result: dict) -> Figure:
    """The soak's VmRSS samples against time, minutes from the counted part's start (the
    warm-up is negative), with the counted window shaded and its start and end readings marked."""
    samples = (result.get("samples") or {}).get("rss_mib") or []
    summary = result.get("summary") or {}
    minutes = result.get("minutes") or 0
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(7.0, 4.0), layout="constrained")
        ax = fig.add_subplot()
        ax.axvspan(0, minutes, color="tab:green", alpha=0.08, label=f"counted window ({minutes:g} min)")
        if samples:
            ts, mib = zip(*samples)
            ax.plot([t / 60 for t in ts], mib, "-", color="tab:blue", marker=".", markersize=3,
                    label="VmRSS of the service")
        for key, label, marker in (("rss_start_mib", "start", "v"), ("rss_end_mib", "end", "^")):
            if summary.get(key) is not None:
                x = 0 if label == "start" else minutes
                ax.plot([x], [summary[key]], marker, color="tab:red", markersize=7,
                        label=f"counted {label}: {summary[key]:.1f} MiB")
        ax.set_xlabel("time since the counted part began (min; warm-up before 0)")
        ax.set_ylabel("resident memory (MiB)")
        drift = summary.get("rss_drift_percent")
        ax.set_title(f"Soak: {result.get('backend', '?')}, {result.get('clients', '?')} clients, "
                     f"{result.get('max_tokens', '?')} tokens a request"
                     + (f"; RSS drift {drift:+.2f}%" if drift is not None else "")
                     + f"\n{_machine_line(result)}; {result.get('started_at', '')}")
        ax.legend(loc="lower right")
    return fig


def save(fig: Figure, path: Path) -> str:
    """Write `fig` to `path` (its suffix names the format); returns the file name."""
    # The SVG settings in RC are read when the file is written, not when the figure is built.
    with matplotlib.rc_context(RC):
        # No date in the SVG's metadata, so the same result draws the same file.
        fig.savefig(path, dpi=150, metadata={"Date": None} if path.suffix == ".svg" else None)
    return path.name


def write_run_plots(result: dict, out_dir: Path, fmt: str = "svg") -> list[str]:
    """throughput.<fmt> and latency.<fmt> of a benchmark result, in `out_dir`; their names."""
    return [save(throughput_figure(result), out_dir / f"throughput.{fmt}"),
            save(latency_figure(result), out_dir / f"latency.{fmt}")]


def write_soak_plots(result: dict, out_dir: Path, fmt: str = "svg") -> list[str]:
    """soak-rss.<fmt> of a soak result, in `out_dir`; its name."""
    return [save(soak_rss_figure(result), out_dir / f"soak-rss.{fmt}")]


def write_plots(result: dict, out_dir: Path, fmt: str = "svg") -> list[str]:
    """The plots of either kind of result (a soak's result.json says "kind": "soak")."""
    write = write_soak_plots if result.get("kind") == "soak" else write_run_plots
    return write(result, out_dir, fmt)


def draw(result: dict, out_dir: Path, log=print) -> list[str]:
    """`write_plots` for a run that has just measured: a plot that fails to draw is logged and
    left out, since the measurements behind it took minutes and are saved regardless."""
    try:
        return write_plots(result, out_dir)
    except Exception as exc:  # noqa: BLE001 - any failure of matplotlib's must not lose the result
        log(f"the plots failed: {type(exc).__name__}: {exc}")
        return []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plots",
                                description="Draw a saved run's plots again from its result.json.")
    p.add_argument("result_dir", type=Path, help="a run's folder (bench/results/<stamp>-<preset>) or its result.json")
    p.add_argument("--format", choices=FORMATS, default="svg", help="file format (default svg)")
    p.add_argument("--out-dir", type=Path, help="where to write them (default: beside result.json)")
    args = p.parse_args(argv)
    path = args.result_dir if args.result_dir.suffix == ".json" else args.result_dir / "result.json"
    out_dir = args.out_dir or path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in write_plots(json.loads(path.read_text()), out_dir, args.format):
        print(out_dir / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
