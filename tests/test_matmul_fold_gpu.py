"""schedules/matmul_fold.py in the GPU build (bmvcc/gpu_build.py:fuse): what folds into a float matmul is what
DLight's matmul rule can schedule correctly. The folded definitions are compiled for the host against numpy here;
the scheduled kernels against their definitions by `bmvcc verify` (tests/test_orin_build.py, the PTX emulator)."""

from __future__ import annotations

import re

import numpy as np
import tvm
from tvm import relax
from tvm.s_tir import dlight as dl

from bmvcc import gpu_build
from bmvcc.schedules.cpu_default import schedule_fused
from bmvcc.targets import get as get_target

HEADS, TOKENS, HEAD_DIM = 4, 25, 10  # tests/test_tune_gpu.py's model: DLight pads the head dimension
WIDTH = HEADS * HEAD_DIM


def _on_host(fused):
    """The Relax VM of fuse's module built for the host (its PrimFuncs as bmvcc's CPU rules schedule them)."""
    host = get_target("host").target()
    return relax.VirtualMachine(tvm.compile(schedule_fused(fused, host), target=host), tvm.cpu())


def _attention_tail():
    """P V per head, the head merge (heads, tokens, head_dim) -> (tokens, heads * head_dim), the output projection
    and the residual add behind its reshape: the float attention path of a model whose head size the attention
    kernels do not take."""
    shapes = {"p": (HEADS, TOKENS, TOKENS), "v": (HEADS, TOKENS, HEAD_DIM), "w": (WIDTH, WIDTH), "b": (WIDTH,),
              "r": (1, TOKENS, WIDTH)}
    bb = relax.BlockBuilder()
    params = {n: relax.Var(n, relax.TensorType(s, "float16" if n in "pvw" else "float32")) for n, s in shapes.items()}
    with bb.function("main", list(params.values())):
        with bb.dataflow():
            pv = bb.emit(relax.op.matmul(params["p"], params["v"], out_dtype="float32"))
            heads = relax.op.permute_dims(relax.op.reshape(pv, (1, HEADS, TOKENS, HEAD_DIM)), [0, 2, 1, 3])
            merged = bb.emit(relax.op.astype(relax.op.reshape(heads, (TOKENS, WIDTH)), "float16"))
            proj = bb.emit(relax.op.add(relax.op.matmul(merged, params["w"], out_dtype="float32"), params["b"]))
            out = bb.emit_output(relax.op.add(relax.op.reshape(proj, (1, TOKENS, WIDTH)), params["r"]))
        bb.emit_func_output(out)
    return bb.get()


def test_head_merge_folds_into_the_projection_not_into_p_v():
    """The residual add reads the projection's output one element per iteration (the reshape adds a unit axis):
    folded as its epilogue. The head merge reads P V's output with its head and head_dim axes fused into one column
    index, which DLight's padded write-back of P V cannot bound per axis: not folded there (before, DLight refused
    that function: "consumers of the cache-write stage that are not properly inlined"); being a copy (and cast), it
    folds into the projection's operand loads instead. DLight's matmul rule takes both functions of the result."""
    spec = get_target("jetson-orin-nano")
    fused, _ = gpu_build.fuse(_attention_tail(), spec)
    names = sorted(gv.name_hint for gv in fused.get_global_vars() if gv.name_hint != "main")
    assert len(names) == 2 and re.fullmatch(r"matmul\d*", names[1]), names
    projection = r"fused_reshape\d*_transpose\d*_reshape\d*_cast\d*_matmul\d*_add\d*_reshape\d*_add\d*"
    assert re.fullmatch(projection, names[0]), names
    target = spec.target()
    with target:  # DLight's matmul rule takes both (no fallback to its generic rules)
        assert all(dl.gpu.Matmul().apply(fused[name], target, False) is not None for name in names)


def test_each_callee_is_analysed_once(monkeypatch):
    """fold_into_matmuls works out a PrimFunc's kind once, not again after every fold (that made it quadratic in the
    bindings): the attention tail's two folds see each callee, the folded ones included, once."""
    from bmvcc.schedules import matmul_fold

    analysed = []
    kind = matmul_fold._kind
    monkeypatch.setattr(matmul_fold, "_kind", lambda func: analysed.append(func) or kind(func))
    gpu_build.fuse(_attention_tail(), get_target("jetson-orin-nano"))
    distinct = len(set(analysed))  # PrimFuncs hash and compare by identity
    assert distinct >= 4 and len(analysed) == distinct, f"{len(analysed)} analyses of {distinct} PrimFuncs"


def test_folded_definitions_compute_the_attention_tail():
    """fuse's module (the folded functions as bmvcc's CPU rules schedule them) built for the host, against numpy in
    float64 with the model's one fp16 rounding (the merged heads, the projection's operand). Tolerance: the fp32
    sums reordered (1e-5 of the output's scale), plus every merged element possibly rounded to the other fp16
    neighbour (its ulp, 2^-10 relative, times the largest column sum of |w|); a wrong head, token or column is
    off by O(1)."""
    rng = np.random.default_rng(0)
    p = rng.random((HEADS, TOKENS, TOKENS)).astype("float16")
    v = rng.standard_normal((HEADS, TOKENS, HEAD_DIM)).astype("float16")
    w = rng.standard_normal((WIDTH, WIDTH)).astype("float16")
    b, r = rng.standard_normal(WIDTH).astype("float32"), rng.standard_normal((1, TOKENS, WIDTH)).astype("float32")
    fused, _ = gpu_build.fuse(_attention_tail(), get_target("jetson-orin-nano"))
    out = _on_host(fused)["main"](*(tvm.runtime.tensor(a) for a in (p, v, w, b, r))).numpy()
    pv = p.astype(np.float64) @ v
    merged = pv.transpose(1, 0, 2).reshape(TOKENS, WIDTH).astype(np.float16).astype(np.float64)
    ref = merged @ w + b + r
    bound = 1e-5 * np.abs(ref).max() + 2.0**-10 * np.abs(pv).max() * np.abs(w.astype(np.float64)).sum(0).max()
    np.testing.assert_allclose(out, ref, rtol=0, atol=bound)


def _head(rows: int):
    """The classifier: layer norm of `rows` pooled rows of 64, cast to fp16, times a 64 x 10 matrix, plus bias."""
    bb = relax.BlockBuilder()
    shapes = {"x": ((rows, 64), "float32"), "g": ((64,), "float32"), "be": ((64,), "float32"),
              "w": ((64, 10), "float16"), "b": ((10,), "float32")}
    params = {n: relax.Var(n, relax.TensorType(s, d)) for n, (s, d) in shapes.items()}
    with bb.function("main", list(params.values())):
        with bb.dataflow():
            x, g, be, w, b = params.values()
            normed = bb.emit(relax.op.astype(relax.op.nn.layer_norm(x, g, be, [1]), "float16"))
            out = bb.emit_output(relax.op.add(relax.op.matmul(normed, w, out_dtype="float32"), b))
        bb.emit_func_output(out)
    return bb.get()


def test_layer_norm_folds_into_a_one_row_head():
    """One row: the layer norm joins the head matmul, one DLight kernel (GeneralReduction: the row's statistics and
    each logit reduced across one CTA's threads), which computes the head (built for the host against numpy: the
    layer norm in float64, rounded to fp16 as the model does; tolerance as in the test above). Two rows: a
    matmul DLight's tensor-core or GEMV rules schedule, not folded."""
    spec = get_target("jetson-orin-nano")
    fused, _ = gpu_build.fuse(_head(1), spec)
    (name,) = [gv.name_hint for gv in fused.get_global_vars() if gv.name_hint != "main"]
    assert re.fullmatch(r"fused_layer_norm\d*_cast\d*_matmul\d*_add\d*", name), name
    target = spec.target()
    with target:  # DLight's GeneralReduction rule takes it (its matmul and GEMV rules do not)
        assert dl.gpu.GeneralReduction().apply(fused[name], target, False) is not None
        assert all(rule.apply(fused[name], target, False) is None for rule in (dl.gpu.Matmul(), dl.gpu.GEMV()))
    rng = np.random.default_rng(1)
    x, g, be = (rng.standard_normal(s).astype("float32") for s in ((1, 64), (64,), (64,)))
    w, b = rng.standard_normal((64, 10)).astype("float16"), rng.standard_normal(10).astype("float32")
    out = _on_host(fused)["main"](*(tvm.runtime.tensor(a) for a in (x, g, be, w, b))).numpy()
    x64 = x.astype(np.float64)
    normed = (x64 - x64.mean(1, keepdims=True)) / np.sqrt(x64.var(1, keepdims=True) + 1e-5) * g + be
    ref = normed.astype(np.float16).astype(np.float64) @ w + b
    bound = 1e-5 * np.abs(ref).max() + 2.0**-10 * np.abs(normed).max() * np.abs(w.astype(np.float64)).sum(0).max()
    np.testing.assert_allclose(out, ref, rtol=0, atol=bound)
    two, _ = gpu_build.fuse(_head(2), spec)
    assert len([gv for gv in two.get_global_vars() if gv.name_hint != "main"]) == 2
