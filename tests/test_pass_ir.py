"""Each bmvcc pass on a small hand-written module: the module it produces, written out by hand, compared
with tvm.ir.assert_structural_equal (bound variable names do not matter, structure and types do).
quantize_bitlinear and fuse_norm_quant match the whole BitLinear quantization graph; their rewrites
are checked on imported models in test_passes_bitlinear.py and test_passes_kernels.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from bmvcc.passes.drop_training_outputs import drop_training_outputs
from bmvcc.passes.externalize_weights import externalize_weights
from bmvcc.passes.fp16_matmuls import fp16_matmuls
from bmvcc.passes.fuse_w2a8_epilogue import fuse_w2a8_epilogue
from bmvcc.passes.pad_w2a8_to_tiles import PADDED_FROM_ATTR, pad_w2a8_to_tiles
from bmvcc.passes.pipeline import module_pass, passes
from bmvcc.passes.relax_match import REPORT_PREFIX
from bmvcc.schedules import w2a8_cuda
from bmvcc.schedules.w2a8 import W2A8Config, w2a8_compute


def test_drop_training_outputs():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 3), "float32")) -> R.Tuple(R.Tensor((2, 3), "float32"), R.Tensor((2, 3), "float32")):
            with R.dataflow():
                logits = R.add(x, x)
                matcher = R.multiply(x, x)
                out = (logits, matcher)
                R.output(out)
            return out

    @I.ir_module
    class After:
        @R.function
        def main(x: R.Tensor((2, 3), "float32")) -> R.Tensor((2, 3), "float32"):
            with R.dataflow():
                logits = R.add(x, x)
                matcher = R.multiply(x, x)
                out = (logits, matcher)
                R.output(out)
            first = out[0]
            return first

    # the pass builds main's body without inferring its type; the next pass (canonicalize_bindings) does
    tvm.ir.assert_structural_equal(relax.transform.Normalize()(drop_training_outputs(Before)), After)
    tvm.ir.assert_structural_equal(drop_training_outputs(After), After)  # a single output: unchanged


def test_fp16_matmuls_cast_before_layout_ops():
    @I.ir_module
    class Before:
        @R.function
        def main(a: R.Tensor((4, 8), "float32"), b: R.Tensor((4, 8), "float32")) -> R.Tensor((4, 4), "float32"):
            with R.dataflow():
                bt = R.permute_dims(b, axes=[1, 0])
                c = R.matmul(a, bt)
                R.output(c)
            return c

    @I.ir_module
    class After:
        @R.function
        def main(a: R.Tensor((4, 8), "float32"), b: R.Tensor((4, 8), "float32")) -> R.Tensor((4, 4), "float32"):
            with R.dataflow():
                bt = R.permute_dims(b, axes=[1, 0])  # dead now: dead_code_elimination removes it
                a16 = R.astype(a, "float16")
                b16 = R.astype(b, "float16")
                bt16 = R.permute_dims(b16, axes=[1, 0])
                c = R.matmul(a16, bt16, out_dtype="float32")
                R.output(c)
            return c

    tvm.ir.assert_structural_equal(fp16_matmuls(Before), After)


def test_externalize_weights():
    big, scale = np.arange(64, dtype="float32").reshape(8, 8), np.array(2.0, "float32")

    def module(weight):
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType((8, 8), "float32"))
        params = [x] + ([weight] if isinstance(weight, relax.Var) else [])
        with bb.function("main", params):
            with bb.dataflow():
                y = bb.emit(relax.op.add(x, weight))
                out = bb.emit_output(relax.op.multiply(y, relax.const(scale)))
            bb.emit_func_output(out)
        return bb.get()

    after, weights = externalize_weights(module(relax.const(big)))
    tvm.ir.assert_structural_equal(after, module(relax.Var("w0", relax.TensorType((8, 8), "float32"))))
    assert len(weights) == 1 and np.array_equal(weights[0].numpy(), big)  # the scalar stays inline


def _w2a8_module(cfg: W2A8Config, epilogue_op=None):
    """main(q, packed, x_scale, w_scale[, residual]) calling w2a8_compute(cfg), then `epilogue_op` on its output."""
    bb = relax.BlockBuilder()
    args = [relax.Var("q", relax.TensorType((cfg.m, cfg.k), "int8")),
            relax.Var("packed", relax.TensorType((cfg.n, cfg.k_packed), "uint8")),
            relax.Var("x_scale", relax.TensorType((cfg.m, 1), "float32")),
            relax.Var("w_scale", relax.TensorType((1,), "float32"))]
    residual = relax.Var("residual", relax.TensorType((cfg.m, cfg.n), "float32"))
    params = args + ([residual] if cfg.epilogue == "residual" or epilogue_op == "residual" else [])
    with bb.function("main", params):
        with bb.dataflow():
            gv = bb.add_func(w2a8_compute(cfg), f"w2a8_m{cfg.m}_n{cfg.n}_k{cfg.k}"
                             + ("" if cfg.epilogue == "none" else f"_{cfg.epilogue}"))
            kernel_args = args + ([residual] if cfg.epilogue == "residual" else [])
            y = bb.emit(relax.call_tir(gv, kernel_args, relax.TensorType((cfg.m, cfg.n), "float32")))
            if epilogue_op == "gelu":
                y = bb.emit(relax.op.nn.gelu(y))
            elif epilogue_op == "residual":
                y = bb.emit(relax.op.add(residual, y))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("epilogue", ["gelu", "residual"])
def test_fuse_w2a8_epilogue(epilogue):
    plain, fused = W2A8Config(16, 32, 64), W2A8Config(16, 32, 64, epilogue)
    before = _w2a8_module(plain, epilogue)
    params = list(before["main"].params)
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            out_ty = relax.TensorType((16, 32), "float32")
            bb.emit(relax.call_tir(bb.add_func(w2a8_compute(plain), "w2a8_m16_n32_k64"), params[:4], out_ty))  # dead
            # the residual enters as an [M, N] operand (a reshape, here to its own shape)
            args = params[:4] + ([bb.emit(relax.op.reshape(params[4], (16, 32)))] if epilogue == "residual" else [])
            y = bb.emit(relax.call_tir(bb.add_func(w2a8_compute(fused), f"w2a8_m16_n32_k64_{epilogue}"), args, out_ty))
            out = bb.emit_output(bb.emit(y))  # the epilogue's binding, now an alias of the kernel's output
        bb.emit_func_output(out)
    after = fuse_w2a8_epilogue(before)
    key = REPORT_PREFIX + "fuse_w2a8_epilogue"
    expected = {"gelu": int(epilogue == "gelu"), "gelu_tanh": 0, "residual": int(epilogue == "residual"), "bias": 0}
    assert json.loads(after.attrs[key]) == expected
    tvm.ir.assert_structural_equal(after.without_attr(key), bb.get())


def test_pad_w2a8_to_tiles_pads_operands_and_slices_the_output():
    cfg = W2A8Config(20, 40, 40, "residual")  # no axis a multiple of the default tiles
    knobs = w2a8_cuda.default_knobs(cfg)
    p = w2a8_cuda.padded(cfg, knobs)
    assert (p.m, p.n, p.k) != (cfg.m, cfg.n, cfg.k)

    bb = relax.BlockBuilder()
    q, packed, x_scale, w_scale, residual = _w2a8_module(cfg)["main"].params
    with bb.function("main", [q, packed, x_scale, w_scale, residual]):
        with bb.dataflow():
            kernel = w2a8_compute(p).with_attr(PADDED_FROM_ATTR, {"config": vars(cfg), "knobs": vars(knobs)})
            gv = bb.add_func(kernel, f"w2a8_tc_m{p.m}_n{p.n}_k{p.k}_residual")
            padded_args = [bb.emit(relax.op.nn.pad(q, [0, p.m - cfg.m, 0, p.k - cfg.k], pad_value=0)),
                           bb.emit(relax.op.nn.pad(packed, [0, p.n - cfg.n, 0, p.k_packed - cfg.k_packed],
                                                   pad_value=w2a8_cuda.PACKED_ZERO)),
                           bb.emit(relax.op.nn.pad(x_scale, [0, p.m - cfg.m, 0, 0], pad_value=1.0)),
                           w_scale,
                           bb.emit(relax.op.nn.pad(residual, [0, p.m - cfg.m, 0, p.n - cfg.n], pad_value=0.0))]
            y = bb.emit(relax.call_tir(gv, padded_args, relax.TensorType((p.m, p.n), "float32")))
            sliced = bb.emit(relax.op.strided_slice(y, axes=[0, 1], begin=[0, 0], end=[cfg.m, cfg.n],
                                                    assume_inbound=True))
            out = bb.emit_output(sliced)
        bb.emit_func_output(out)
    tvm.ir.assert_structural_equal(pad_w2a8_to_tiles(_w2a8_module(cfg)), bb.get())


def test_pad_w2a8_to_tiles_keeps_an_aligned_kernel():
    cfg = W2A8Config(16, 32, 64)
    assert w2a8_cuda.padded(cfg, w2a8_cuda.default_knobs(cfg)) == cfg
    before = _w2a8_module(cfg)
    after = pad_w2a8_to_tiles(before)
    (name,) = [gv.name_hint for gv in after.functions if gv.name_hint != "main"]
    assert name == "w2a8_m16_n32_k64"  # the same function, now carrying its knobs
    tvm.ir.assert_structural_equal(after["main"], before["main"])
    knobs = vars(w2a8_cuda.default_knobs(cfg))
    tvm.ir.assert_structural_equal(after[name], before[name].with_attr(PADDED_FROM_ATTR, {"config": vars(cfg), "knobs": knobs}))


def test_pipeline_passes_are_module_passes():
    for device in ("cpu", "cuda"):
        listed = passes(device=device)
        assert all(isinstance(p, tvm.transform.Pass) for _, p in listed)
        assert ("pad_w2a8_to_tiles" in dict(listed)) == (device == "cuda")
    wrapped = module_pass(drop_training_outputs)
    assert wrapped.info.name == "drop_training_outputs"
