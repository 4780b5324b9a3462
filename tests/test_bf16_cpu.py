"""--float-precision bf16: the Linear layers' matmuls and causal attention on bf16 operands, vdpbf16ps on CPUs with
AVX-512 BF16.

Error model. bf16 keeps 8 significand bits (7 stored), so rounding an operand to nearest is off by at most
u = 2^-8 relative; a product of two rounded operands by at most (1 + u)^2 - 1 < 2^-6.9 relative. vdpbf16ps
forms the products of the rounded operands exactly in fp32 (8 x 8 bits), so against float64 products of the
same rounded operands a K-long dot product is off by fp32 accumulation only, K * 2^-24 * sum_k |a_k w_k|:
the kernel tests compare so, which also tells rounding to nearest even from truncation (off by up to 2^-7).
Through a model no bound stays elementwise (layer norms, softmax, BitLinear's int8 rounding), so the model is
compared instead with PyTorch computing the same roundings (operands of every float Linear rounded to bf16, and
causal attention's as its bf16 kernel rounds them: _bf16_attention; test_attention_cpu.py bounds that kernel).
What remains are the float32 build's differences (tests/test_passes_model.py): fp32 sums in another order,
~1e-6, unless a value within an ulp of a rounding tie (int8 code, or here a bf16 one) lands on the other side,
which moves the logits by at most ~1e-3: ATOL 2e-3, as there. bf16 itself moves the logits by more than that
(asserted), so the test tells them apart.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import math
import re
from dataclasses import replace

import ml_dtypes
import numpy as np
import pytest
import torch
import tvm
from tvm import relax, te

from bmvcc import precision
from bmvcc.cli import main
from bmvcc.driver import CompileOptions, compile_model
from bmvcc.errors import BmvccError
from bmvcc.frontend import Source, to_relax
from bmvcc.model import BitMedViT, MultiQueryAttention
from bmvcc.passes.pipeline import run_pipeline
from bmvcc.passes.bf16_matmuls import bf16_matmuls
from bmvcc.schedules.cpu_default import schedule_cpu_module
from bmvcc.schedules.cpu_rules import matmul as matmul_rule
from bmvcc.targets import get as get_target
from bmvcc.targets.base import TargetSpec
from bmvcc.targets.cpu import BF16_DOT_FEATURE, has_bf16_dot

from conftest import cli_error, small_config

HOST = get_target("host").target()
needs_bf16 = pytest.mark.skipif(not has_bf16_dot(HOST), reason=f"this CPU ({HOST.attrs.get('mcpu')}) lacks "
                                f"{BF16_DOT_FEATURE}: a bf16 build cannot run here")
ATOL = 2e-3  # logits against PyTorch with the same roundings (see the module docstring)
ACCUMULATION = 2.0**-24  # fp32 rounding per addition
M, K, N = 64, 96, 80  # N: 5 vectors of 16 lanes (not one register tile), K: 48 pairs


def _linear(w: np.ndarray, b: np.ndarray) -> tvm.IRModule:
    """relu(x) @ w + b, w and b constants (a Linear layer after an activation, whose kernel the cast joins)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((M, K), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = relax.op.add(relax.op.matmul(relax.op.nn.relu(x), relax.const(w)), relax.const(b))
            out = bb.emit_output(bb.emit(y))
        bb.emit_func_output(out)
    return relax.transform.FoldConstant()(bf16_matmuls(bb.get()))


def _weights():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((M, K)).astype("float32"), (rng.standard_normal((K, N)) / np.sqrt(K)).astype("float32"),
            rng.standard_normal(N).astype("float32"))


def test_only_matmuls_with_a_weight_of_whole_pairs_and_vectors_take_bf16():
    """x @ W (W [16, 16] a constant, sliced (strided_slice takes Tuples) and transposed) narrows; x @ y (two
    computed operands, as attention's)
    does not, nor z @ V with V [15, 16] (K not in pairs of k: vdpbf16ps would not take it)."""
    bb = relax.BlockBuilder()
    x, y, z = (relax.Var(n, relax.TensorType(shape, "float32"))
               for n, shape in (("x", (8, 16)), ("y", (16, 16)), ("z", (8, 15))))
    with bb.function("main", [x, y, z]):
        with bb.dataflow():
            w = relax.op.permute_dims(relax.op.strided_slice(relax.const(np.ones((32, 16), "float32")), [0], [0], [16]))
            odd = relax.const(np.ones((15, 16), "float32"))
            products = [relax.op.matmul(x, w), relax.op.matmul(x, y), relax.op.matmul(z, odd)]
            out = bb.emit_output(bb.emit(relax.op.add(relax.op.add(*products[:2]), products[2])))
        bb.emit_func_output(out)
    narrowed = bf16_matmuls(bb.get())
    matmuls = []
    relax.analysis.post_order_visit(narrowed["main"], lambda e: matmuls.append(e) if isinstance(e, relax.Call)
                                    and e.op.same_as(tvm.ir.Op.get("relax.matmul")) else None)
    operand_dtypes = sorted(tuple(str(a.ty.dtype) for a in m.args) for m in matmuls)
    assert operand_dtypes == [("bfloat16", "bfloat16")] + [("float32", "float32")] * 2, narrowed


def _truncated(x: np.ndarray) -> np.ndarray:
    """x's float32 values cut to bf16 (low 16 bits dropped): what a kernel that truncated would multiply."""
    return (x.astype(np.float32).view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32).astype(np.float64)


@needs_bf16
def test_linear_is_exact_bf16_products_with_fp32_sums():
    """Against float64 products of the operands rounded to nearest even (ml_dtypes), fp32 sums of K + 1 terms
    (the bias the last) are the only error; the same operands truncated fall outside that (negative control)."""
    x, w, b = _weights()
    scheduled = schedule_cpu_module(_linear(w, b), HOST)
    vm = relax.VirtualMachine(tvm.compile(scheduled, target=HOST), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x)).numpy()
    a = np.maximum(x, 0)
    a16, w16 = (v.astype(ml_dtypes.bfloat16).astype(np.float64) for v in (a, w))
    tolerance = 1.01 * (K + 1) * ACCUMULATION * (np.abs(a16) @ np.abs(w16) + np.abs(b))
    assert (np.abs(out - (a16 @ w16 + b)) <= tolerance).all()
    truncated = _truncated(a) @ _truncated(w) + b
    assert (np.abs(out - truncated) > tolerance).mean() > 0.9


@needs_bf16
def test_matmul_rule_with_a_prologue_and_one_column_strip():
    """A bf16 A computed in the same function (a cast behind a reshape) stays a block of its own, whose
    buffer vdpbf16ps reads; N = 48 is one register tile (B packed for its pairs all the same); int32 indices."""
    m, k, n = 32, 64, 48
    x, b = te.placeholder((m * k,), "float32", name="x"), te.placeholder((k, n), "bfloat16", name="b")
    a = te.compute((m, k), lambda i, r: x[i * k + r].astype("bfloat16"), name="a")
    r = te.reduce_axis((0, k), "r")
    c = te.compute((m, n), lambda i, j: te.sum(a[i, r].astype("float32") * b[r, j].astype("float32"), axis=r))
    built = tvm.compile(matmul_rule.apply(te.create_prim_func([x, b, c]), HOST).mod, target=HOST)
    assert "vdpbf16ps" in built.mod.inspect_source("asm")
    rng = np.random.default_rng(0)
    xs, bs = rng.standard_normal(m * k).astype("float32"), rng.standard_normal((k, n)).astype(ml_dtypes.bfloat16)
    out = tvm.runtime.tensor(np.zeros((m, n), "float32"))
    built(tvm.runtime.tensor(xs), tvm.runtime.tensor(bs), out)
    a64, b64 = xs.astype(ml_dtypes.bfloat16).astype(np.float64).reshape(m, k), bs.astype(np.float64)
    exact, magnitude = a64 @ b64, np.abs(a64) @ np.abs(b64)  # the bf16 operands' products, exactly
    assert (np.abs(out.numpy() - exact) <= 1.01 * k * ACCUMULATION * magnitude).all()  # fp32 sums only


@pytest.mark.parametrize("mcpu", ["sapphirerapids", "znver4"])
def test_linear_runs_on_vdpbf16ps(mcpu):
    """Built (not run) for AVX-512 BF16 CPUs, whatever this machine is: the register tile on zmm vdpbf16ps."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": 2})
    _, w, b = _weights()
    (llvm,) = [m for m in tvm.compile(schedule_cpu_module(_linear(w, b), target), target=target).mod.imports
               if m.kind == "llvm"]
    asm = llvm.inspect_source("asm")
    assert re.search(r"vdpbf16ps\s+\S+, %zmm\d+, %zmm\d+", asm), "the bf16 matmul does not use vdpbf16ps on zmm"


def _fits_vdpbf16ps(m: torch.nn.Module) -> bool:
    """A float Linear layer (not BitLinear) that vdpbf16ps takes: in features in pairs, out in vectors of 16."""
    return type(m) is torch.nn.Linear and m.in_features % 2 == 0 and m.out_features % 16 == 0


@pytest.mark.parametrize("multi_query, fp_attn", [(True, False), (True, True), (False, False)],
                         ids=["bitlinear", "fp_attn", "multi-head"])
def test_report_counts_the_narrowed_matmuls(multi_query, fp_attn):
    """small_config's projections are BitLinear (W2A8), its patch embedding has K = 7 x 7 (odd) and its head 10
    columns: no matmul fits; fp_attn's float projections do. Multi-query models' causal attention takes bf16
    products (one kernel per layer); multi-head ones have no mask (no kernel on CPUs): with no matmul either, the
    summary says the build is float32."""
    cfg = small_config(multi_query=multi_query, fp_attn=fp_attn)
    model = BitMedViT(cfg).eval()
    mod = to_relax(Source(model, (1, 28, 28), cfg.num_classes, None, cfg), 1)
    _, _, report = run_pipeline(mod, get_target("host"), float_precision="bf16")
    fitting = sum(map(_fits_vdpbf16ps, model.modules()))
    assert report["bf16_narrowed"] == fitting and (fitting > 0) == fp_attn
    assert report["bf16_attention"] == (cfg.depth if multi_query else 0)
    line = precision.describe("bf16", report, None)
    assert ("no matmul fits vdpbf16ps" in line and "the build is float32" in line) == (not multi_query), line
    assert (f"({fitting} Linear layers' matmuls and {cfg.depth} attention layers' Q.K^T and P.V on bf16 operands"
            in line) == multi_query, line


def _bf16_emulation(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose float Linear layers that vdpbf16ps takes round weights and inputs to bf16, and whose
    multi-query attention computes as the bf16 kernel does (_bf16_attention)."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if _fits_vdpbf16ps(m):
            m.weight.data = m.weight.data.bfloat16().float()
            m.register_forward_pre_hook(lambda _m, args: (args[0].bfloat16().float(),))
        if isinstance(m, MultiQueryAttention):
            m.forward = functools.partial(_bf16_attention, m)
    return model


def _bf16_attention(m: MultiQueryAttention, x: torch.Tensor) -> torch.Tensor:
    """MultiQueryAttention.forward with the bf16 kernel's roundings (schedules/attention_cpu.py): q (scaled in float32),
    k, v and the probabilities exp(s - row max) rounded to bf16, P V divided by their sum (one key block here: the
    row max is the final one)."""
    b, n, _ = x.shape
    bf16 = lambda t: t.bfloat16().float()
    qkv = m.Wqkv(x)
    q = qkv[..., : m.dim].reshape(b, n, m.heads, m.head_dim).transpose(1, 2) * torch.tensor(1 / math.sqrt(m.head_dim))
    k, v = qkv[..., m.dim : m.dim + m.head_dim].unsqueeze(1), qkv[..., m.dim + m.head_dim :].unsqueeze(1)
    scores = bf16(q) @ bf16(k).transpose(-1, -2) + m.mask
    p = bf16(torch.exp(scores - scores.amax(-1, keepdim=True)))
    ctx = p @ bf16(v) / p.sum(-1, keepdim=True)
    return m.out_proj(ctx.transpose(1, 2).reshape(b, n, m.dim))


def _compile_bf16(source, out) -> dict:
    """`bmvcc compile SOURCE -o OUT --float-precision bf16 --json`: the summary."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        main(["compile", str(source), "-o", str(out), "--float-precision", "bf16", "--json"])
    return json.loads(stdout.getvalue())


def _check_reported_error(error: dict, model: torch.nn.Module, input_shape: tuple) -> None:
    """The summary's float32_error against PyTorch's on the seeded images: the bf16-emulated model's error
    from the float32 model (above 2 ATOL, so no error at all would fail), which the build's is within ATOL of
    (the build is within ATOL of the emulation), and the argmax agreement counted on the emulation (whose top
    two logits lie more than 2 ATOL apart, so the build's argmax is the emulation's)."""
    seeded = np.random.default_rng(precision.ERROR_SEED).standard_normal((precision.ERROR_IMAGES, *input_shape))
    x = torch.from_numpy(seeded.astype("float32"))
    with torch.no_grad():
        emulated, float32 = (m(x) for m in (_bf16_emulation(model), model))
    emulated, float32 = ((y[0] if isinstance(y, tuple) else y).numpy() for y in (emulated, float32))
    top2 = np.sort(emulated, axis=1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0] > 2 * ATOL).all() and np.abs(emulated - float32).max() > 2 * ATOL
    assert error["images"] == 4
    assert abs(error["max_abs_logit_error"] - np.abs(emulated - float32).max()) <= ATOL
    assert error["argmax_agrees"] == int((emulated.argmax(1) == float32.argmax(1)).sum())


@needs_bf16
def test_compile_bf16_matches_pytorch_with_bf16_roundings(checkpoint, tmp_path):
    path, model = checkpoint(small_config(fp_attn=True))
    out = tmp_path / "out"
    summary = _compile_bf16(path, out)
    assert summary["float_precision"] == "bf16" and summary["causal_attention_fused"] == summary["bf16_attention"] == 2
    assert summary["bf16_narrowed"] == sum(map(_fits_vdpbf16ps, model.modules()))
    assert json.loads((out / "metadata.json").read_text())["float_precision"] == "bf16"
    from bmvcc.runtime import load

    images = np.random.default_rng(1).standard_normal((4, 1, 28, 28)).astype("float32")
    logits = load(out)(images)
    with torch.no_grad():
        emulated = _bf16_emulation(model)(torch.from_numpy(images)).numpy()
        float32 = model(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(logits, emulated, atol=ATOL, rtol=0)
    assert np.abs(logits - float32).max() > ATOL  # the bf16 rounding shows against float32
    _check_reported_error(summary["float32_error"], model, (1, 28, 28))


@needs_bf16
def test_compile_bf16_reports_the_error_of_bf16_attention(checkpoint, tmp_path):
    """small_config: BitLinear projections (no matmul narrowed), its 2 causal attention layers on bf16 products: the
    build is not float32, and the summary line gives its error against the float32 model."""
    path, model = checkpoint(small_config())
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        main(["compile", str(path), "-o", str(tmp_path / "out"), "--float-precision", "bf16"])
    (line,) = [x for x in stdout.getvalue().splitlines() if x.startswith("float precision:")]
    found = re.fullmatch(r"float precision: bf16 \(0 Linear layers' matmuls and 2 attention layers' Q\.K\^T and P\.V "
                         r"on bf16 operands, float32 accumulation\); against the float32 PyTorch model on 4 seeded "
                         r"random images: max \|logit error\| (\S+), argmax agrees on (\d) of 4", line)
    assert found, line
    error = {"images": 4, "max_abs_logit_error": float(found[1]), "argmax_agrees": int(found[2])}
    _check_reported_error(error, model, (1, 28, 28))


class _TupleOut(torch.nn.Module):
    """Two Linear layers vdpbf16ps takes (64 -> 32 -> 16), the logits in a 1-tuple; logits of a few units (the
    head's weights scaled), on which bf16 moves the argmax of one seeded image."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = torch.nn.Linear(64, 32), torch.nn.Linear(32, 16)
        with torch.no_grad():
            self.fc2.weight *= 10

    def forward(self, x):
        return (self.fc2(torch.relu(self.fc1(x.flatten(1)))),)


@needs_bf16
def test_compile_bf16_of_a_static_batch_pt2_with_a_tuple_output(tmp_path):
    """A .pt2 exported for a fixed batch of 3 (torch.export's default) takes no batch of 4 seeded images:
    the measurement runs it in chunks of 3 (the last padded), and reads the tuple's logits."""
    model = _TupleOut().eval()
    torch.export.save(torch.export.export(model, (torch.zeros(3, 1, 8, 8),)), tmp_path / "m.pt2")
    summary = _compile_bf16(tmp_path / "m.pt2", tmp_path / "out")
    assert summary["bf16_narrowed"] == 2
    _check_reported_error(summary["float32_error"], model, (1, 8, 8))
    assert summary["float32_error"]["argmax_agrees"] == 3


@needs_bf16
def test_compile_model_measures_only_when_asked(tmp_path):
    """The measurement (a PyTorch forward, a module load) is the CLI's summary's: compile_model's other callers
    (bench_model_cpu) do not pay for it unless they set measure_float32_error."""
    model = _TupleOut().eval()
    torch.export.save(torch.export.export(model, (torch.zeros(1, 1, 8, 8),)), tmp_path / "m.pt2")
    notes = []
    options = CompileOptions(float_precision="bf16")
    assert compile_model(tmp_path / "m.pt2", tmp_path / "out", options, notes.append).float32_error is None
    assert not any("measuring" in note for note in notes), notes
    measured = compile_model(tmp_path / "m.pt2", tmp_path / "measured", replace(options, measure_float32_error=True))
    assert measured.float32_error["images"] == 4


def test_a_failed_measurement_is_noted_not_raised(tmp_path):
    """The artifact is finished when the measurement runs: a source whose forward fails leaves no error
    measured and a note saying why, no exception."""

    class Fails(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("no kernel for\nthis input")

    notes = []
    source = Source(Fails(), (1, 8, 8), 16, tmp_path / "m.pt2")
    assert precision.error_vs_float32(tmp_path, source, notes.append) is None
    assert notes == ["error against float32 not measured: RuntimeError: no kernel for this input"]


@pytest.mark.parametrize("target, needle", [
    ("aarch64", "error: --float-precision bf16 needs a CPU with AVX-512 BF16 (avx512bf16: vdpbf16ps), which target "
                "'aarch64' (cortex-a78) lacks; compile with the default --float-precision float32"),
    ("jetson-orin-nano", "error: --float-precision bf16 is for CPU targets, and 'jetson-orin-nano' is a GPU"),
], ids=["aarch64", "gpu"])
def test_bf16_refused_without_the_instructions(checkpoint, tmp_path, capsys, target, needle):
    out = tmp_path / "out"
    line = cli_error(capsys, ["compile", str(checkpoint(small_config())[0]), "-o", str(out), "-t", target,
                              "--float-precision", "bf16"])
    assert line.startswith(needle), line
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unknown_precision(checkpoint, tmp_path, capsys):
    line = cli_error(capsys, ["compile", str(checkpoint(small_config())[0]), "-o", str(tmp_path / "out"),
                              "--float-precision", "fp8"])
    assert line == "error: unknown --float-precision 'fp8'; choose one of: float32, bf16"


def test_x86_without_avx512bf16_refused():
    """An AVX2 CPU (Zen 3) and an AVX-512 one without BF16 (Skylake-SP), as the CI machines may be."""
    for mcpu in ("znver3", "skylake-avx512"):
        spec = TargetSpec(mcpu, "", lambda mcpu=mcpu: {"kind": "llvm", "mcpu": mcpu}, "x86_64")
        with pytest.raises(BmvccError, match=f"which target '{mcpu}' \\({mcpu}\\) lacks"):
            precision.check("bf16", spec)


def test_host_not_reporting_avx512_bf16_refused(monkeypatch):
    """A host whose CPU name has AVX-512 BF16 (Zen 4) but whose running CPU does not report it (a VM hiding it): its
    name alone would pass, and the first vdpbf16ps would SIGILL; the host target turns it off and bf16 is refused,
    saying why. Reporting every feature of its name, it passes."""
    from bmvcc.targets import cpu
    from bmvcc.targets.isa import record

    monkeypatch.setattr(cpu, "_llvm_cpu", lambda: "znver4")
    zen4 = set(record({"kind": "llvm", "mcpu": "znver4"}, "x86_64")["features"].values())
    def host(flags):
        return TargetSpec("host", "", lambda: cpu._host_target(2, None, frozenset(flags)), "x86_64")

    precision.check("bf16", host(zen4))
    with pytest.raises(BmvccError, match="this machine's CPU is a znver4 but does not report avx512_bf16 \\(a "
                                         "virtual machine may hide it\\)"):
        precision.check("bf16", host(zen4 - {"avx512_bf16"}))
