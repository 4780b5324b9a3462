"""`bmvcc report OUTDIR --plot FILE`: the roofline chart and the time bar, checked by what they draw (the
matplotlib Figure the plot function returns) and by the written image's pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bmvcc.cli import main
from bmvcc.errors import BmvccError
from bmvcc.roofline_plot import DPI, FIGSIZE, TOP, plot_roofline
from bmvcc.targets import get

from conftest import cli_error


def _points(ax) -> np.ndarray:
    """The scatter points (x, y) of `ax`, sorted."""
    return np.array(sorted(tuple(p) for c in ax.collections for p in c.get_offsets()))


def _bars(ax) -> tuple[list[float], list[str]]:
    return [p.get_width() for p in ax.patches], [t.get_text() for t in ax.get_yticklabels()]


def test_plot_shows_each_kernel_on_the_targets_roofs(orin_build, tmp_path):
    import matplotlib.image
    from matplotlib.colors import to_rgba

    from bmvcc.report import plot, report

    r = report(orin_build)
    fig = plot(r, tmp_path / "report.png")
    roofline, bar = fig.axes[:2]
    assert (roofline.get_xscale(), roofline.get_yscale()) == ("log", "log")
    assert (roofline.get_xlabel(), roofline.get_ylabel()) == ("arithmetic intensity (ops/byte)", "throughput (ops/s)")
    assert fig.get_suptitle().startswith(f"{r['source']} (batch 1) on jetson-orin-nano: estimated")

    # the roofs: the target's peaks (in Gop/s) as horizontal lines, DRAM bandwidth as the line y = bw * x
    facts = get("jetson-orin-nano").facts
    peaks = {"int8 tensor cores": facts["peak_int8_tops"] * 1e3, "fp16 tensor cores": facts["peak_fp16_tflops"] * 1e3,
             "fp32 CUDA cores": facts["peak_fp32_tflops"] * 1e3}
    flat = {line.get_ydata()[0]: line for line in roofline.get_lines() if line.get_ydata()[0] == line.get_ydata()[1]}
    assert sorted(flat) == pytest.approx(sorted(peaks.values()))
    slopes = [y / x for line in roofline.get_lines() if line not in flat.values()
              for x, y in zip(line.get_xdata(), line.get_ydata())]
    assert slopes == pytest.approx([facts["dram_bandwidth_gbs"]] * 2)

    # one point per kernel that does arithmetic, at (ops/byte, ops/s) of its estimate; an estimate (launch
    # overhead included) lies under both its unit's roof and the DRAM roof; its colour is its roof's
    counted = [k for k in r["kernels"] if k["macs"]]
    assert len(counted) < len(r["kernels"])  # small_config launches copies too: they are only in the bar
    expected = sorted((2 * k["macs"] / k["bytes"], 2 * k["macs"] / k["estimate"]["seconds"] / 1e9) for k in counted)
    np.testing.assert_allclose(_points(roofline), expected, rtol=1e-9)
    for k in counted:
        x = 2 * k["macs"] / k["bytes"]
        assert 2 * k["macs"] / k["estimate"]["seconds"] / 1e9 < min(peaks[k["unit"]], x * facts["dram_bandwidth_gbs"])
    roof_colors = {unit: to_rgba(line.get_color()) for unit in peaks for y, line in flat.items()
                   if y == pytest.approx(peaks[unit])}
    for c in roofline.collections:
        assert tuple(c.get_facecolor()[0]) == roof_colors[c.get_label().removeprefix("kernels on ")]

    # the bar: the top kernels by estimated time, then "other"; the bars add up to the model's total but the
    # CUDA graph's launch (in the title)
    widths, labels = _bars(bar)
    assert len(widths) == TOP + 1 and labels[0].startswith(f"1. {r['kernels'][0]['kernel'][:34]} x")
    assert labels[-1] == f"other ({len(r['kernels']) - TOP} kernels)"
    assert sum(widths) == pytest.approx((r["estimated_total_s"] - r["cuda_graph_launch_s"]) * 1e6)
    assert r["cuda_graph_launch_s"] > 0 and fig.get_suptitle().endswith(f"{r['cuda_graph_launch_s'] * 1e6:.0f} µs more)")
    assert widths[:TOP] == sorted(widths[:TOP], reverse=True)

    # the image: the figure's size in pixels, drawn on (not one colour), with the int8 roof's red in it
    img = matplotlib.image.imread(tmp_path / "report.png")
    assert img.shape == (FIGSIZE[1] * DPI, FIGSIZE[0] * DPI, 4)
    assert (img[..., :3] < 0.9).any(axis=-1).mean() > 0.02
    red = np.array(to_rgba("tab:red")[:3])
    assert (np.abs(img[..., :3] - red).max(axis=-1) < 0.02).sum() > 100
    assert [p.name for p in tmp_path.iterdir()] == ["report.png"]  # no temporary file left


def test_cli_plot_with_json(orin_build, tmp_path, capsys):
    out = tmp_path / "r.svg"
    main(["report", str(orin_build), "--plot", str(out), "--json"])
    assert json.loads(capsys.readouterr().out)["target"] == "jetson-orin-nano"  # stdout stays JSON
    assert out.read_text().lstrip().startswith("<?xml") and "<svg" in out.read_text()


@pytest.mark.parametrize("name, message", [
    ("missing/r.png", "output parent directory '{tmp}/missing' does not exist; create it first"),
    (".", "output '{tmp}' is a directory; name a file with --plot"),
    ("r.jpg", "plot '{tmp}/r.jpg' is not a .png, .svg or .pdf file; name one with --plot, e.g. --plot report.png"),
])
def test_cli_bad_plot_path_is_one_line(orin_build, tmp_path, capsys, monkeypatch, name, message):
    monkeypatch.chdir(tmp_path)
    assert cli_error(capsys, ["report", str(orin_build), "--plot", name]) == "error: " + message.format(tmp=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_measured_kernels_without_roofs(tmp_path):
    """The shape `bench --profile` gives: measured times, no roofs, no units, a copy without arithmetic."""
    kernels = [{"name": "dense", "calls": 2, "ops": 2e6, "bytes": 1e5, "seconds": 4e-5},
               {"name": "softmax", "calls": 1, "ops": 1e4, "bytes": 8e3, "seconds": 1e-5},
               {"name": "copy", "calls": 3, "ops": 0, "bytes": 4e3, "seconds": 2e-6}]
    fig = plot_roofline(kernels, {}, "model on host: measured", tmp_path / "p.png")
    roofline, bar = fig.axes[:2]
    np.testing.assert_allclose(_points(roofline), [(1.25, 1.0), (20.0, 50.0)])  # Gop/s
    assert roofline.get_lines() == []
    assert any("not shown: 1 kernel without counted arithmetic" in t.get_text() for t in roofline.texts)
    widths, labels = _bars(bar)
    assert widths == pytest.approx([80.0, 10.0, 6.0]) and labels == ["1. dense x2", "2. softmax x1", "3. copy x3"]
    gone = tmp_path / "gone" / "p.png"  # a folder not there (say, removed after the command checked it)
    with pytest.raises(BmvccError, match=r"^cannot write '.*/p.png' \(No such file or directory\); choose another --plot$"):
        plot_roofline(kernels, {}, "t", gone)
