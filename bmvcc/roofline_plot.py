"""A roofline chart of a model's kernels beside a bar of where its time goes (`bmvcc report --plot`).

`plot_roofline` takes plain dicts, so estimated times (bmvcc report) and measured ones share it:
  kernels: [{"name", "calls", "ops", "bytes", "seconds"} (ops, bytes and seconds per call; ops may be None),
            optionally "unit": the compute roof the kernel runs on, whose colour its point takes]
  roofs:   {"compute": {name: peak ops/s}, "memory": {name: bytes/s}} (either may be empty)
A kernel is a point at (ops / bytes, ops / seconds) when all three are positive; one without counted
arithmetic (a copy) has no place on log axes and shows only in the bar, as a note says. matplotlib (Agg)
is imported only when plotting: the command line stays fast.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .artifact import check_output_file, write_error
from .errors import BmvccError

FORMATS = (".png", ".svg", ".pdf")  # matplotlib writes each without extra packages
TOP = 8  # kernels named in the bar; the rest is one "other" bar
FIGSIZE, DPI = (14, 6), 110
GIGA = 1e9  # throughput axis unit: Gop/s
PALETTE = ("tab:red", "tab:purple", "tab:blue", "tab:green", "tab:orange", "tab:brown", "tab:pink", "tab:olive")


def check_plot_path(path: Path) -> Path:
    """The absolute `path` if a plot can be written there: an image suffix and a writable folder."""
    path = check_output_file(path, option="--plot")
    if path.suffix.lower() not in FORMATS:
        raise BmvccError(f"plot '{path}' is not a {', '.join(FORMATS[:-1])} or {FORMATS[-1]} file; "
                         "name one with --plot, e.g. --plot report.png")
    return path


def plot_roofline(kernels: list[dict], roofs: dict, title: str, path: Path, top: int = TOP):
    """Draws the chart (module docstring), writes it to `path` atomically (format from the suffix) and
    returns the matplotlib Figure."""
    fig = roofline_figure(kernels, roofs, title, top)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format=path.suffix.lower()[1:], dpi=DPI)
        os.replace(tmp, path)
    except OSError as e:
        raise write_error(e, path, option="--plot") from None
    finally:
        tmp.unlink(missing_ok=True)
    return fig


def roofline_figure(kernels: list[dict], roofs: dict, title: str, top: int = TOP):
    """The chart as a matplotlib Figure on an Agg canvas (no pyplot: no global state, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, width_ratios=(3, 2))
    ranked = sorted(kernels, key=lambda k: -k["seconds"] * k["calls"])
    compute = roofs.get("compute", {})
    units = list(compute) + sorted({k.get("unit") for k in kernels} - set(compute) - {None})
    colors = dict(zip(units, PALETTE))  # a roof and the kernels that run on it share a colour
    _roofline(left, ranked[:top], ranked, roofs, colors)
    _time_bar(right, ranked, top, colors)
    fig.suptitle(title, fontsize=13)
    return fig


def _plotted(k: dict) -> bool:
    return bool(k["ops"]) and k["bytes"] > 0 and k["seconds"] > 0


def _color(k: dict, colors: dict) -> str:
    return colors.get(k.get("unit"), "tab:gray") if _plotted(k) else "lightgray"


def _roofline(ax, named: list[dict], kernels: list[dict], roofs: dict, colors: dict) -> None:
    from matplotlib import ticker

    compute, memory = roofs.get("compute", {}), roofs.get("memory", {})
    points = [k for k in kernels if _plotted(k)]
    xs = [k["ops"] / k["bytes"] for k in points]
    ys = [k["ops"] / k["seconds"] / GIGA for k in points]
    peaks = {name: ops / GIGA for name, ops in compute.items()}
    top_peak, top_bw = max(peaks.values(), default=None), max(memory.values(), default=None)
    ridges = [p * GIGA / top_bw for p in peaks.values()] if top_bw else []
    x_lo, x_hi = _decades(xs + ridges)
    y_lo, y_hi = _decades(ys + list(peaks.values()) + ([top_bw * x_lo / GIGA] if top_bw else []), 100.0)
    ax.set(xscale="log", yscale="log", xlim=(x_lo, x_hi), ylim=(y_lo, y_hi),
           xlabel="arithmetic intensity (ops/byte)", ylabel="throughput (ops/s)", title="roofline")
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    rate = ticker.EngFormatter("op/s")
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: rate(v * GIGA)))
    ax.grid(True, which="major", alpha=0.3)

    for name, bw in memory.items():  # diagonal up to the highest compute roof
        x_end = top_peak * GIGA / bw if top_peak else x_hi
        ax.plot([x_lo, x_end], [bw * x_lo / GIGA, bw * x_end / GIGA], color="black", lw=2)
        x_text, y_text = x_lo * 1.6, bw * x_lo * 1.6 / GIGA * 4  # above the line, parallel to it:
        ax.text(x_text, y_text, f"{name} {_eng(bw, 'B/s')}", rotation=math.degrees(math.atan2(y_text, x_text)),
                transform_rotates_text=True, rotation_mode="anchor", fontsize=9)  # (data angle of slope 1 in log-log)
    for name, peak in peaks.items():  # horizontal from its ridge point
        ax.plot([peak * GIGA / top_bw if top_bw else x_lo, x_hi], [peak, peak], color=colors[name], lw=2)
        ax.text(x_hi / 1.15, peak * 1.12, f"{name} {_eng(peak * GIGA, 'op/s')}", ha="right", fontsize=9,
                color=colors[name])

    total = sum(k["seconds"] * k["calls"] for k in kernels) or 1.0
    for unit in dict.fromkeys(k.get("unit") for k in points):
        group = [i for i, k in enumerate(points) if k.get("unit") == unit]
        ax.scatter([xs[i] for i in group], [ys[i] for i in group], zorder=3, edgecolors="black", linewidths=0.5,
                   s=[30 + 600 * points[i]["seconds"] * points[i]["calls"] / total for i in group],
                   color=_color(points[group[0]], colors), label=f"kernels on {unit}" if unit else "kernels")
    labels: list = []  # the bar's numbers beside their points; points within 1/15 decade share one label
    for rank, k in enumerate(named, 1):
        if _plotted(k):
            x, y = k["ops"] / k["bytes"], k["ops"] / k["seconds"] / GIGA
            near = [lb for lb in labels if max(abs(math.log10(x / lb[0])), abs(math.log10(y / lb[1]))) < 1 / 15]
            if near:
                near[0][2].append(str(rank))
            else:
                labels.append((x, y, [str(rank)]))
    for x, y, numbers in labels:
        ax.annotate(",".join(numbers), (x, y), xytext=(6, -4), textcoords="offset points", fontsize=9, weight="bold")
    for handle in ax.legend(loc="lower right", fontsize=8).legend_handles:
        handle.set_sizes([40])  # not the first kernel's size
    off = [k for k in kernels if not _plotted(k)]
    if off:
        t = sum(k["seconds"] * k["calls"] for k in off)
        ax.text(0.01, 0.99, f"not shown: {len(off)} kernel{'s' * (len(off) > 1)} without counted arithmetic "
                f"(copies), {_us(t)}, {100 * t / total:.0f}% of the time (light grey bars)", transform=ax.transAxes,
                va="top", fontsize=8)


def _time_bar(ax, ranked: list[dict], top: int, colors: dict) -> None:
    times = [k["seconds"] * k["calls"] for k in ranked]
    total = sum(times) or 1.0
    labels = [f"{rank}. {k['name'][:34]} x{k['calls']}" for rank, k in enumerate(ranked[:top], 1)]
    values, shades = times[:top], [_color(k, colors) for k in ranked[:top]]
    if len(ranked) > top:
        labels.append(f"other ({len(ranked) - top} kernels)")
        values.append(sum(times[top:]))
        shades.append("dimgray")
    bars = ax.barh(range(len(values)), [v * 1e6 for v in values], color=shades, edgecolor="black", linewidth=0.5)
    ax.set_yticks(range(len(values)), labels, fontsize=9)
    ax.invert_yaxis()  # the most time on top
    ax.bar_label(bars, [f" {_us(v)} ({100 * v / total:.0f}%)" for v in values], fontsize=8)
    ax.set_xlim(0, max(values, default=0) * 1e6 * 1.35 or 1)
    ax.set(xlabel="time per run (µs)", title=f"where the time goes: {_us(sum(times))} in {len(ranked)} kernels")


def _decades(values: list[float], span: float = 1.0) -> tuple[float, float]:
    """Whole decades around `values` with some room, at least `span` wide (a ratio)."""
    values = [v for v in values if v > 0] or [1.0]
    lo, hi = math.floor(math.log10(min(values) / 2)), math.ceil(math.log10(max(values) * 2))
    while 10 ** (hi - lo) < span:
        lo, hi = lo - 1, hi + 1
    return 10.0 ** lo, 10.0 ** hi


def _eng(value: float, unit: str) -> str:
    from matplotlib.ticker import EngFormatter

    return EngFormatter(unit, places=1)(value)


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.2f} µs" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"
