"""BitNet-style ViTs written from the published recipes (tests/bitnet_models.py), saved with
torch.export.save and compiled like a user's model: every BitLinear of a CLS-token ViT and of a
DeiT-style model rewritten, in four spellings, on the host and for the Jetson Orin's GPU.

Numerical reference: the PyTorch model itself. Tolerance 1e-3 on logits of magnitude ~1: the
compiled model computes the same int8 codes and ternary weights, so only float summation order
differs (~1e-6); one activation code flipped at a rounding tie would move a logit by about
w_scale * absmax / 127 ~ 1e-2 through the head, far above that.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bmvcc
from bmvcc.driver import CompileOptions, compile_model

from bitnet_models import SPELLINGS, ViT, deit, randomized
from conftest import cli_error

ARCHS = {"vit": (ViT, (1, 28, 28)), "deit": (deit, (3, 32, 32))}
BATCH = 2
# per spelling: does F.linear carry a bias; is a norm right before every quantizer (else only where the
# block's LayerNorm precedes the layer: qkv / q, k, v and fc1; the out-projection and fc2 quantize raw)
FACTS = {"b158_ste": (True, True), "clamp_round": (True, False), "codes": (False, True), "binary_v1": (True, True)}


def _bitlinears(model) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, tuple(SPELLINGS.values()))]


def _export(model, shape, path: Path) -> Path:
    torch.export.save(torch.export.export(model, (torch.zeros(BATCH, *shape),)), path)
    return path


def _images(shape) -> np.ndarray:
    return np.random.RandomState(7).randn(BATCH, *shape).astype(np.float32)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(model, artifact dir, metadata) per (spelling, arch, target), compiled once."""
    cache = {}

    def get(spelling: str, arch: str, target: str = "host"):
        key = (spelling, arch, target)
        if key not in cache:
            make, shape = ARCHS[arch]
            model = randomized(make(SPELLINGS[spelling]))
            tmp = tmp_path_factory.mktemp(f"{spelling}-{arch}-{target}")
            source = _export(model, shape, tmp / "model.pt2")
            report = compile_model(source, tmp / "out", CompileOptions(target=target))
            cache[key] = model, tmp / "out", report.metadata
        return cache[key]

    return get


def _check_report(model, arch: str, spelling: str, bl: dict) -> None:
    names = _bitlinears(model)
    assert bl["rewritten"] == len(names) and bl["layers"] == names and bl["not_rewritten"] == [], bl
    bias, normed = FACTS[spelling]
    blocks = len(model.blocks)
    first = 3 if arch == "deit" else 1  # BitLinears reading the block's first LayerNorm
    assert bl["norm_quant_fused"] == (len(names) if normed else (first + 1) * blocks)
    gelu = "gelu_tanh" if arch == "deit" else "gelu"
    assert bl["epilogues"] == {"gelu": 0, "gelu_tanh": 0, gelu: blocks, "residual": 2 * blocks,
                               "bias": len(names) if bias else 0}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spelling", SPELLINGS)
def test_every_bitlinear_rewritten_and_logits_match(compiled, spelling, arch):
    model, out, metadata = compiled(spelling, arch)
    _check_report(model, arch, spelling, metadata["passes"]["bitlinear"])
    x = _images(ARCHS[arch][1])
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = bmvcc.load(out)(x)
    np.testing.assert_allclose(got, ref, atol=1e-3)  # see the module docstring
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_weights_bin_holds_no_square_fill_and_no_tensor_twice(compiled):
    """torch SDPA's guard imports as where(row all -inf, zeros [B, H, N, N], P) in every block, kept on the CPU
    (whose attention kernel is causal only): passes/scalar_fills.py leaves a scalar zero; and passes/
    externalize_weights.py stores the blocks' equal tensors (the ones gain of each fc2's RMSNorm) once."""
    import tvm

    _, out, _ = compiled("b158_ste", "vit")
    arrays = [t.numpy() for t in tvm.runtime.load_param_dict((out / "weights.bin").read_bytes()).values()]
    assert len({(a.dtype.str, a.shape, a.tobytes()) for a in arrays}) == len(arrays)
    assert not [a.shape for a in arrays if a.shape[-2:] == (17, 17)]  # 17 tokens


@pytest.mark.slow
@pytest.mark.parametrize("spelling, arch", [("b158_ste", "vit"), ("binary_v1", "deit")])
def test_orin_build_runs_every_bitlinear_on_tensor_cores(compiled, spelling, arch):
    """GPU builds (20+ s each): erf GELU with bias and RMSNorm; tanh GELU with LayerNorm (BitNet v1)."""
    from bmvcc import gpu_build
    from bmvcc.device_summary import sass

    model, out, metadata = compiled(spelling, arch, "jetson-orin-nano")
    _check_report(model, arch, spelling, metadata["passes"]["bitlinear"])
    info = json.loads((out / gpu_build.DEVICE_INFO).read_text())
    calls = info["calls"]
    launches: dict = {}
    for name, k in info["bmvcc_kernels"].items():
        key = k["kernel"] if k["kernel"] in ("norm_quant", "attention_prefill") else k["config"]["epilogue"]
        launches[key] = launches.get(key, 0) + calls[name]["calls"]
    blocks, gelu = len(model.blocks), "bias_gelu_tanh" if arch == "deit" else "bias_gelu"
    qkv = 3 if arch == "deit" else 1
    assert launches == {"bias": qkv * blocks, gelu: blocks, "residual": 2 * blocks,
                        "norm_quant": len(_bitlinears(model)), "attention_prefill": blocks}, launches
    assert "IMMA.16832.S8.S8" in sass(out)
    # the new kernel variants (bias epilogues, LayerNorm norm_quant, SDPA's attention) emulated from their PTX
    # (bmvcc verify) agree with their compute definitions
    from bmvcc.ptx.verify import verify_artifact

    ours = [r for r in verify_artifact(out, max_ctas=4) if r["primfunc"] in info["bmvcc_kernels"]]
    assert len(ours) == len(info["bmvcc_kernels"]) and all(r["verdict"] == "ok" for r in ours), ours


def test_a_look_alike_layer_is_a_warning_in_the_summary(tmp_path):
    """A per-output-channel weight scale (not one per tensor) cannot run on the W2A8 kernel: the layer
    stays float and the compile summary warns, naming it and the reason."""

    class PerChannel(SPELLINGS["b158_ste"]):
        def forward(self, x):
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
            scale = 1.0 / self.weight.abs().mean(dim=1, keepdim=True).clamp(min=1e-5)
            wq = (self.weight * scale).round().clamp(-1, 1) / scale
            xs = 127.0 / x.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
            return torch.nn.functional.linear((x * xs).round().clamp(-128, 127) / xs, wq, self.bias)

    model = randomized(ViT(SPELLINGS["b158_ste"], depth=1))
    model.blocks[0].fc1 = randomized(PerChannel(32, 64))
    from bmvcc.frontend import Source, to_relax
    from bmvcc.passes.pipeline import describe, run_pipeline
    from bmvcc.targets import get

    _, _, report = run_pipeline(to_relax(Source(model, (1, 28, 28), 10, tmp_path / "m.pt2"), 1), get("host"))
    text = describe(report)
    assert report["bitlinear"]["rewritten"] == 3
    assert re.search(r"^warning: blocks\.0\.fc1 looks like a BitLinear but is not rewritten \(it runs in float\): "
                     r".*not ternary codes times one scale", text, re.M), text


def test_an_operator_tvm_cannot_import_is_one_error_line(tmp_path, capsys):
    """A .pt2 using an operator TVM's PyTorch frontend has no converter for (aten.i0): one error line naming
    it, no traceback, no output directory."""

    class Bessel(torch.nn.Module):
        def forward(self, img):
            return torch.special.i0(img).mean((2, 3))

    source = _export(Bessel(), (1, 4, 4), tmp_path / "bessel.pt2")
    line = cli_error(capsys, ["compile", str(source), "-o", str(tmp_path / "out")])
    assert "TVM's PyTorch frontend cannot import" in line and "i0.default" in line, line
    assert not (tmp_path / "out").exists()


def _readme_example() -> tuple[str, str]:
    """The Python and shell blocks of README's "Compiling your own BitNet-style model"."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    section = text.split("## Compiling your own BitNet-style model", 1)[1].split("\n## ", 1)[0]
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    shell = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return python, shell


def test_readme_example(tmp_path, monkeypatch):
    """README's example, run as written in a fresh folder: the Python block trains a few steps and
    exports model.pt2 and images.npy, the shell block compiles and runs it; every BitLinear is
    rewritten and the logits are PyTorch's."""
    python, shell = _readme_example()
    monkeypatch.chdir(tmp_path)
    exec(compile(python, "README.md", "exec"), namespace := {"__name__": "readme"})  # noqa: S102
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # this venv's bmvcc
    done = subprocess.run(["bash", "-ec", shell], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "BitLinear: 8 layers -> int8 x 2-bit W2A8 kernels (8 with fused norm+quantization" in done.stdout
    assert "warning" not in done.stdout
    model, images = namespace["model"], np.load("images.npy")
    with torch.no_grad():
        ref = model(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(np.load("logits.npy"), ref, atol=1e-3)  # see the module docstring


def test_onnx_export_compiles_like_the_pt2(compiled, tmp_path):
    """torch.onnx.export (its default exporter; opset 20, the first with a Gelu op) of the b1.58 ViT: the
    exporter folds each weight's straight-through estimator w + (q - w) into a constant within float
    rounding of q; every BitLinear is still rewritten (named by the exporter's initializers) with the
    same fusions as from the .pt2, and the logits match PyTorch's."""
    import contextlib
    import io
    import warnings

    model, _, metadata = compiled("b158_ste", "vit")
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(BATCH, 1, 28, 28),), str(path), opset_version=20)
    report = compile_model(path, tmp_path / "out", CompileOptions()).metadata["passes"]["bitlinear"]
    assert report["rewritten"] == len(_bitlinears(model)) and report["not_rewritten"] == [], report
    pt2 = metadata["passes"]["bitlinear"]
    assert (report["norm_quant_fused"], report["epilogues"]) == (pt2["norm_quant_fused"], pt2["epilogues"])
    x = _images((1, 28, 28))
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = bmvcc.load(tmp_path / "out")(x)
    np.testing.assert_allclose(got, ref, atol=1e-3)  # see the module docstring
    assert (got.argmax(-1) == ref.argmax(-1)).all()
