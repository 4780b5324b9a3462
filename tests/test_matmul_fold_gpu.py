"""schedules/matmul_fold.py in the GPU build (bmvcc/gpu_build.py:fuse): what folds into a float matmul is what
DLight's matmul rule can schedule correctly. Numerics of the folded kernels: `bmvcc verify` in
tests/test_orin_build.py (the PTX emulator against their definitions)."""

from __future__ import annotations

import re

from tvm import relax

from bmvcc import gpu_build
from bmvcc.targets import get as get_target

HEADS, TOKENS, HEAD_DIM = 4, 25, 10  # tests/test_tune_gpu.py's model: DLight pads the head dimension


def _attention_tail():
    """P V per head, the head merge (heads, tokens, head_dim) -> (tokens, heads * head_dim), the output projection
    and the residual add behind its reshape: the float attention path of a model whose head size the attention
    kernels do not take."""
    width = HEADS * HEAD_DIM
    shapes = {"p": (HEADS, TOKENS, TOKENS), "v": (HEADS, TOKENS, HEAD_DIM), "w": (width, width), "b": (width,),
              "r": (1, TOKENS, width)}
    bb = relax.BlockBuilder()
    params = {n: relax.Var(n, relax.TensorType(s, "float16" if n in "pvw" else "float32")) for n, s in shapes.items()}
    with bb.function("main", list(params.values())):
        with bb.dataflow():
            pv = bb.emit(relax.op.matmul(params["p"], params["v"], out_dtype="float32"))
            heads = relax.op.permute_dims(relax.op.reshape(pv, (1, HEADS, TOKENS, HEAD_DIM)), [0, 2, 1, 3])
            merged = bb.emit(relax.op.astype(relax.op.reshape(heads, (TOKENS, width)), "float16"))
            proj = bb.emit(relax.op.add(relax.op.matmul(merged, params["w"], out_dtype="float32"), params["b"]))
            out = bb.emit_output(relax.op.add(relax.op.reshape(proj, (1, TOKENS, width)), params["r"]))
        bb.emit_func_output(out)
    return bb.get()


def test_residual_add_folds_and_the_head_merge_does_not():
    """The residual add reads the projection's output one element per iteration (the reshape adds a unit axis):
    folded, DLight's epilogue. The head merge reads P V's output with its head and head_dim axes fused into one
    column index, which DLight's padded write-back cannot bound per axis: not folded (before, DLight refused the
    folded function: "consumers of the cache-write stage that are not properly inlined"). DLight schedules every
    function of the result."""
    spec = get_target("jetson-orin-nano")
    fused, _ = gpu_build.fuse(_attention_tail(), spec)
    names = [gv.name_hint for gv, f in fused.functions_items() if gv.name_hint != "main"]
    assert [n for n in names if re.fullmatch(r"fused_matmul\d*_add\d*_reshape\d*_add\d*", n)], names
    (pv,) = [n for n in names if "matmul" in n and "add" not in n]
    assert "reshape" not in pv and "transpose" not in pv, names
    scheduled = gpu_build.schedule_rest(fused, spec)
    assert all(f.attrs.get("tirx.is_scheduled", False) for gv, f in scheduled.functions_items() if gv.name_hint != "main")
