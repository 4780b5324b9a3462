"""passes/fp16_matmuls.py: in CUDA builds the float matmuls take fp16 operands (fp32 accumulation).

Its semantics are checked without a GPU: the module the GPU pipeline produces (W2A8 as the tensor-core
kernel's compute definition, weights in its TC_LAYOUT) is built for and run on the host, against the PyTorch model in float32."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from bmvcc import targets
from bmvcc.frontend import Source, to_relax
from bmvcc.passes.pipeline import describe, run_pipeline

from bitnet_models import ViT, randomized
from conftest import FAMILIES, family_id, make_model, small_config

U16 = 2.0**-11  # fp16 unit roundoff
BATCH = 4


def _pipeline(model, cfg, target: str):
    source = Source(model, (cfg.channels, cfg.image_size, cfg.image_size), cfg.num_classes, None, cfg)
    return run_pipeline(to_relax(source, BATCH), targets.get(target))


def _run_on_host(mod, weights, x: np.ndarray) -> np.ndarray:
    """The GPU pipeline's module built for and run on the host (W2A8: the tensor-core kernel's compute definition,
    as written; bmvcc's other kernels: their definitions)."""
    from bmvcc.schedules.cpu_default import schedule_cpu_module
    from bmvcc.schedules.w2a8 import kernel_of

    for gv, func in mod.functions_items():
        if kernel_of(func) == "w2a8":
            mod[gv] = func.with_attr("tirx.is_scheduled", True)
    host = targets.get("host").target()
    vm = relax.VirtualMachine(tvm.compile(schedule_cpu_module(mod, host), target=host), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x), *weights).numpy()


def _matmuls(mod) -> list:
    found = []

    @relax.expr_functor.visitor
    class _Find(relax.PyExprVisitor):
        def visit_call_(self, call):
            if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.matmul":
                found.append(call)
            super().visit_call_(call)

    _Find().visit_expr(mod["main"])
    return found


# the four families at head size 8 (TVM's prefill kernel), and multi-query at head size 16 (the tensor-core kernel,
# reading Q, K, V from the QKV projection's output and writing the out-projection's input: no layout copies)
CASES = [(*f, 32) for f in FAMILIES] + [(True, fp_attn, 64) for fp_attn in (False, True)]


@pytest.mark.parametrize("multi_query,fp_attn,dim", CASES, ids=[f"{family_id(*c[:2])}-dim{c[2]}" for c in CASES])
def test_gpu_pipeline_logits_match_pytorch_within_fp16_error(multi_query, fp_attn, dim):
    """Tolerance: each float matmul rounds both operands to fp16 (relative u = 2^-11 each; fp32
    accumulation adds nothing comparable). On the way to the logits there are 10 such roundings in
    sequence (patch embedding; per block of 2: Q/K/V projection, the attention kernel's Q and K, its V and
    output (schedules/attention_cuda.py, one kernel per block), output projection; head), so a first-order
    budget of 2 x 10 x u ~ 1e-2 of the logit scale. In the BitLinear-attention
    families, the perturbed attention output can also move an int8 activation code across a .5 tie
    (1/127 of that row's absmax, averaged by the next matmul). Observed: at most 4.0e-3 of the scale."""
    from bmvcc.schedules.w2a8 import kernel_of

    cfg = small_config(multi_query=multi_query, fp_attn=fp_attn, dim=dim)
    model = make_model(cfg, seed=3)
    x = np.random.RandomState(4).randn(BATCH, 1, 28, 28).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    mod, weights, report = _pipeline(model, cfg, "jetson-orin-nano")
    assert report["causal_attention_fused"] == cfg.depth  # causal (multi-query) or not: one attention kernel
    # multi-query float attention: the pre-attention LayerNorm and the Wqkv projection in one kernel (one definition,
    # called by every block); multi-head: q, k and v projections all read the normalized rows, which stay a tensor of
    # their own
    assert report["norm_matmul_fused"] == (cfg.depth if fp_attn and multi_query else 0)
    summary = f"layer norm: {cfg.depth} float projections take their LayerNorm in one kernel"
    assert (summary in describe(report).splitlines()) == (fp_attn and multi_query)
    assert sum(kernel_of(f) == "norm_matmul" for _, f in mod.functions_items()) == (fp_attn and multi_query)
    calls = _matmuls(mod)
    assert calls and all(a.ty.dtype == "float16" for c in calls for a in c.args)
    assert all(c.ty.dtype == "float32" for c in calls)
    out = _run_on_host(mod, weights, x)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(out, ref, rtol=0, atol=2 * 10 * U16 * scale)
    assert np.abs(out - ref).max() > 1e-5 * scale  # fp16 rounding did happen (float32 builds: ~2e-7)
    np.testing.assert_array_equal(out.argmax(1), ref.argmax(1))


def test_gpu_pipeline_fuses_the_layer_norm_before_any_float_linear_with_a_bias():
    """passes/fuse_norm_matmul.py matches by structure, not by layer name: in a ViT of plain float Linear layers
    (tests/bitnet_models.py's, nn.Linear at every site) each block's norm1 -> qkv (one projection, timm-style) and
    norm2 -> fc1 run as one kernel each; the final norm stays (the head reads the CLS token's slice of it). Logits
    against PyTorch: as above, 2 u per fp16 rounding of operands, here at most 14 on the way (patch embedding;
    per block qkv, attention's Q K^T and P V, proj, fc1, fc2; head)."""
    from bmvcc.schedules.w2a8 import kernel_of

    model = randomized(ViT(torch.nn.Linear))
    x = np.random.RandomState(4).randn(BATCH, 1, 28, 28).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    mod, weights, report = run_pipeline(to_relax(Source(model, (1, 28, 28), 10, None), BATCH),
                                        targets.get("jetson-orin-nano"))
    assert report["norm_matmul_fused"] == 2 * len(model.blocks)
    m = BATCH * 17  # 16 patches and the CLS token
    assert sorted(gv.name_hint for gv, f in mod.functions_items() if kernel_of(f) == "norm_matmul") == [
        f"norm_matmul_m{m}_k32_n64", f"norm_matmul_m{m}_k32_n96"]  # fc1 and qkv, each called by both blocks
    np.testing.assert_allclose(_run_on_host(mod, weights, x), ref, rtol=0, atol=2 * 14 * U16 * np.abs(ref).max())


def test_gpu_pipeline_stores_matmul_weights_in_fp16_and_cpu_pipeline_is_unchanged():
    cfg = small_config(multi_query=True, fp_attn=True)
    model = make_model(cfg)
    gpu_mod, gpu_weights, _ = _pipeline(model, cfg, "jetson-orin-nano")
    cpu_mod, cpu_weights, _ = _pipeline(model, cfg, "host")
    # per block: Wqkv, out_proj; plus patch embedding and head: 2 * 2 + 2 float weight matrices
    assert sum(str(w.dtype) == "float16" for w in gpu_weights) == 2 * cfg.depth + 2
    # the same matrices, cast: every fp16 weight is a float32 weight of the CPU build (both drop the
    # causal masks: fuse_causal_attention); small_config's matmuls are too small for DLight's tensor cores, so
    # passes/transpose_matmul_weights.py stores none of them [N, K]
    shapes = lambda ws, dtype: Counter(tuple(w.shape) for w in ws if str(w.dtype) == dtype)  # noqa: E731
    assert shapes(gpu_weights, "float16") <= shapes(cpu_weights, "float32")
    assert "float16" not in cpu_mod.script() and {str(w.dtype) for w in cpu_weights} <= {"float32", "uint8"}


def test_orin_build_runs_the_float_projections_on_fp16_tensor_cores(checkpoint, tmp_path):
    """81 tokens of 7x7x3 px, dim 128, head size 64: the Wqkv projection (81x256x128) runs in bmvcc's LayerNorm + matmul
    kernel (schedules/norm_matmul_cuda.py), the output projection (81x128x128) and the patch embedding (81x128x147)
    have every extent above 64, DLight's threshold for its wmma rule; so is the attention kernel
    (schedules/attention_cuda_tc.py, with the layout copies around it folded in); the head (M = 1) stays on CUDA
    cores. The build must not import tvm.s_tir.tensor_intrin.cuda (schedules/wmma_intrinsics.py stands in for it)."""
    import json
    import sys

    from bmvcc import artifact
    from bmvcc.driver import CompileOptions, compile_model
    from bmvcc.report import report
    from bmvcc.schedules.wmma_intrinsics import TVM_MODULE
    from bmvcc.targets.cuda import SM_LIMITS

    imported_before = TVM_MODULE in sys.modules
    cfg = small_config(multi_query=True, fp_attn=True, image_size=63, channels=3, dim=128, heads=2, mlp_dim=128)
    path, _ = checkpoint(cfg)
    compile_model(path, tmp_path / "out", CompileOptions(target="jetson-orin-nano"))
    assert imported_before or TVM_MODULE not in sys.modules
    rows = report(tmp_path / "out")["kernels"]
    tensor_core = [k for k in rows if k["unit"] == "fp16 tensor cores"]

    def kinds_of(k):
        name = k["kernel"]
        return ("patch_embedding" if "cast_reshape_transpose" in name
                else next((w for w in ("norm_matmul", "matmul", "attention") if w in name), name))

    kinds = Counter(kinds_of(k) for k in tensor_core)
    assert kinds == {"norm_matmul": 1, "matmul": 1, "attention": 1, "patch_embedding": 1}, kinds
    assert all(k["sass_mix"]["HMMA"] > 0 for k in tensor_core)
    assert sorted(k["calls"] for k in tensor_core) == [1] + [cfg.depth] * 3
    # attention reads Q, K and V from the Wqkv projection's [1, 81, 256] fp16 output (one tensor, counted once) and
    # writes the out-projection's fp16 input: no copy kernel per block transposes them (the matmuls' names list the
    # transposes folded into their operand loads: the patch embedding's im2col, passes/transpose_matmul_weights.py's)
    (attention,) = [k for k in tensor_core if "attention" in k["kernel"]]
    assert attention["bytes_read"] == 81 * 256 * 2 and attention["bytes_written"] == 81 * 128 * 2 + 81 * 2 * 2
    assert not [k for k in rows if ("transpose" in k["kernel"] or "expand_dims" in k["kernel"])
                and "matmul" not in k["kernel"]]
    # both operands of the output projection (the attention output, rows 81..127 of its tile zero-filled; its weight,
    # stored [N, K]) and the patch embedding's weight (stored [N, 148], K zero-padded to 8-byte rows; its im2col + cast
    # operand goes through registers) come in by cp.async in a three-stage pipeline (schedules/async_operand_copies.py).
    # Per K tile of 64 the projection issues twice the patch embedding's LDGSTS (the same 128 x 64 tiles, all K tiles
    # in the pipeline's prologue: K = 128 -> 2 tiles, 148 -> 3): its weight copy back on LDG would halve that. No
    # spills, shared memory within sm_87's.
    (projection,) = [k for k in tensor_core if kinds_of(k) == "matmul"]
    (patches,) = [k for k in tensor_core if kinds_of(k) == "patch_embedding"]
    assert patches["sass_mix"].get("LDGSTS", 0) > 0
    assert projection["sass_mix"]["LDGSTS"] / 2 == 2 * patches["sass_mix"]["LDGSTS"] / 3
    info = json.loads((tmp_path / "out" / artifact.DEVICE_INFO).read_text())
    for kernel in (projection["kernel"], patches["kernel"]):
        resources = info["resources"][kernel + "_kernel"]
        assert resources["spill_loads"] == resources["spill_stores"] == 0
        (launch,) = info["launches"][kernel]
        assert resources["shared_bytes"] + launch["dynamic_shared"] <= SM_LIMITS["sm_87"][0]
