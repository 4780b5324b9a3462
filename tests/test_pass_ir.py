"""Each bmvcc pass on a small hand-written module: the module it produces, written out by hand, compared
with tvm.ir.assert_structural_equal (bound variable names do not matter, structure and types do); and
a module with the pattern almost right, which must come out unchanged. The kernels a rewrite calls are
the schedules/ compute definitions for the expected configuration (see _with_kernels); their numerics
are checked against numpy references in test_passes_kernels.py, test_w2a8_cpu.py, test_attention_cpu.py and
test_attention_cuda.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from bmvcc.passes.drop_training_outputs import drop_training_outputs
from bmvcc.passes.externalize_weights import externalize_weights
from bmvcc.passes.fp16_matmuls import fp16_matmuls
from bmvcc.passes.fuse_causal_attention import REPORT_KEY as ATTENTION_KEY
from bmvcc.passes.fuse_causal_attention import fuse_attention_cuda, fuse_causal_attention
from bmvcc.passes.fuse_norm_quant import REPORT_KEY as NORM_QUANT_KEY
from bmvcc.passes.fuse_norm_quant import fuse_norm_quant
from bmvcc.passes.fuse_w2a8_epilogue import REPORT_KEY as EPILOGUE_KEY
from bmvcc.passes.fuse_w2a8_epilogue import fuse_w2a8_epilogue
from bmvcc.passes.pad_w2a8_to_tiles import PADDED_FROM_ATTR, pad_w2a8_to_tiles
from bmvcc.passes.pipeline import module_pass, passes
from bmvcc.passes.quantize_bitlinear import REPORT_KEY as QUANTIZE_KEY
from bmvcc.passes.quantize_bitlinear import quantize_bitlinear
from bmvcc.passes.scalar_fills import scalar_fills
from bmvcc.passes.transpose_matmul_weights import transpose_matmul_weights
from bmvcc.schedules import w2a8_cuda
from bmvcc.schedules.attention_cpu import AttentionConfig, attention_cpu
from bmvcc.schedules.attention_cuda import PrefillConfig, attention_compute
from bmvcc.schedules.norm_quant import NormQuantConfig, norm_quant_compute
from bmvcc.schedules.w2a8 import KERNEL_ATTR, W2A8Config, w2a8_compute


def _with_kernels(mod: tvm.IRModule, **kernels) -> tvm.IRModule:
    """`mod` with each named placeholder PrimFunc (its signature written out, its body empty) replaced by
    the kernel's compute definition: the Relax part stays in TVMScript, the TIR comes from schedules/."""
    for name, func in kernels.items():
        mod.update_func(mod.get_global_var(name), func)
    return mod


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


def test_fp16_matmuls_keeps_a_matmul_already_in_fp16():
    @I.ir_module
    class Before:
        @R.function
        def main(a: R.Tensor((4, 8), "float16"), b: R.Tensor((8, 4), "float16")) -> R.Tensor((4, 4), "float16"):
            with R.dataflow():
                c = R.matmul(a, b)
                R.output(c)
            return c

    tvm.ir.assert_structural_equal(fp16_matmuls(Before), Before)


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


def test_externalize_weights_stores_identical_constants_once():
    """Constants of the same dtype, shape and bytes share one parameter; the same bytes as another dtype or
    shape are other weights."""
    big = np.arange(64, dtype="float32").reshape(8, 8)
    first, again = relax.const(big), relax.const(big.copy())
    as_ints, reshaped = relax.const(big.view("int32")), relax.const(big.reshape(4, 16))

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((8, 8), "float32")):
            with R.dataflow():
                y = R.add(R.add(x, first), again)
                i = R.add(R.astype(x, "int32"), as_ints)
                r = R.add(R.reshape(x, (4, 16)), reshaped)
                R.output(y, i, r)
            return (y, i, r)

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((8, 8), "float32"), w0: R.Tensor((8, 8), "float32"), w1: R.Tensor((8, 8), "int32"),
                 w2: R.Tensor((4, 16), "float32")):
            with R.dataflow():
                y = R.add(R.add(x, w0), w0)
                i = R.add(R.astype(x, "int32"), w1)
                r = R.add(R.reshape(x, (4, 16)), w2)
                R.output(y, i, r)
            return (y, i, r)

    after, weights = externalize_weights(Before)
    tvm.ir.assert_structural_equal(after, Expected)
    assert [w.numpy().tobytes() for w in weights] == [big.tobytes()] * 3


def test_externalize_weights_keeps_constants_below_the_threshold():
    small = relax.const(np.arange(63, dtype="float32").reshape(7, 9))  # one element short of min_elements=64

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((7, 9), "float32")) -> R.Tensor((7, 9), "float32"):
            with R.dataflow():
                y = R.add(x, small)
                R.output(y)
            return y

    after, weights = externalize_weights(Before)
    tvm.ir.assert_structural_equal(after, Before)
    assert weights == []


def _w2a8_module(cfg: W2A8Config):
    """main(q, packed, x_scale, w_scale) returning w2a8_compute(cfg) of them (a config without epilogue)."""
    bb = relax.BlockBuilder()
    args = [relax.Var("q", relax.TensorType((cfg.m, cfg.k), "int8")),
            relax.Var("packed", relax.TensorType((cfg.n, cfg.k_packed), "uint8")),
            relax.Var("x_scale", relax.TensorType((cfg.m, 1), "float32")),
            relax.Var("w_scale", relax.TensorType((1,), "float32"))]
    with bb.function("main", args):
        with bb.dataflow():
            gv = bb.add_func(w2a8_compute(cfg), f"w2a8_m{cfg.m}_n{cfg.n}_k{cfg.k}")
            out = bb.emit_output(relax.call_tir(gv, args, relax.TensorType((cfg.m, cfg.n), "float32")))
        bb.emit_func_output(out)
    return bb.get()


def test_fuse_w2a8_epilogue_gelu():
    @I.ir_module
    class Before:
        @T.prim_func(private=True)
        def w2a8_m16_n32_k64(q: T.Buffer((16, 64), "int8"), wp: T.Buffer((32, 16), "uint8"),
                             xs: T.Buffer((16, 1), "float32"), ws: T.Buffer((1,), "float32"),
                             out: T.Buffer((16, 32), "float32")):
            T.evaluate(0)

        @R.function
        def main(q: R.Tensor((16, 64), "int8"), packed: R.Tensor((32, 16), "uint8"),
                 x_scale: R.Tensor((16, 1), "float32"), w_scale: R.Tensor((1,), "float32")) -> R.Tensor((16, 32), "float32"):
            cls = Before
            with R.dataflow():
                y = R.call_tir(cls.w2a8_m16_n32_k64, (q, packed, x_scale, w_scale), out_ty=R.Tensor((16, 32), "float32"))
                z = R.nn.gelu(y)
                R.output(z)
            return z

    @I.ir_module
    class Expected:
        @T.prim_func(private=True)
        def w2a8_m16_n32_k64(q: T.Buffer((16, 64), "int8"), wp: T.Buffer((32, 16), "uint8"),
                             xs: T.Buffer((16, 1), "float32"), ws: T.Buffer((1,), "float32"),
                             out: T.Buffer((16, 32), "float32")):
            T.evaluate(0)

        @T.prim_func(private=True)
        def w2a8_m16_n32_k64_gelu(q: T.Buffer((16, 64), "int8"), wp: T.Buffer((32, 16), "uint8"),
                                  xs: T.Buffer((16, 1), "float32"), ws: T.Buffer((1,), "float32"),
                                  out: T.Buffer((16, 32), "float32")):
            T.evaluate(0)

        @R.function
        def main(q: R.Tensor((16, 64), "int8"), packed: R.Tensor((32, 16), "uint8"),
                 x_scale: R.Tensor((16, 1), "float32"), w_scale: R.Tensor((1,), "float32")) -> R.Tensor((16, 32), "float32"):
            cls = Expected
            with R.dataflow():
                _ = R.call_tir(cls.w2a8_m16_n32_k64, (q, packed, x_scale, w_scale), out_ty=R.Tensor((16, 32), "float32"))
                fused = R.call_tir(cls.w2a8_m16_n32_k64_gelu, (q, packed, x_scale, w_scale),
                                   out_ty=R.Tensor((16, 32), "float32"))
                z = fused  # the GELU's binding, now an alias of the kernel's output
                R.output(z)
            return z

    plain, gelu = (w2a8_compute(W2A8Config(16, 32, 64, e)) for e in ("none", "gelu"))
    after = fuse_w2a8_epilogue(_with_kernels(Before, w2a8_m16_n32_k64=plain))
    assert json.loads(after.attrs[EPILOGUE_KEY]) == {"gelu": 1, "gelu_tanh": 0, "residual": 0, "bias": 0}
    tvm.ir.assert_structural_equal(after.without_attr(EPILOGUE_KEY),
                                   _with_kernels(Expected, w2a8_m16_n32_k64=plain, w2a8_m16_n32_k64_gelu=gelu))


def test_fuse_w2a8_epilogue_residual():
    @I.ir_module
    class Before:
        @T.prim_func(private=True)
        def w2a8_m16_n32_k64(q: T.Buffer((16, 64), "int8"), wp: T.Buffer((32, 16), "uint8"),
                             xs: T.Buffer((16, 1), "float32"), ws: T.Buffer((1,), "float32"),
                             out: T.Buffer((16, 32), "float32")):
            T.evaluate(0)

        @R.function
        def main(q: R.Tensor((16, 64), "int8"), packed: R.Tensor((32, 16), "uint8"), x_scale: R.Tensor((16, 1), "float32"),
                 w_scale: R.Tensor((1,), "float32"), residual: R.Tensor((16, 32), "float32")) -> R.Tensor((16, 32), "float32"):
            cls = Before
            with R.dataflow():
                y = R.call_tir(cls.w2a8_m16_n32_k64, (q, packed, x_scale, w_scale), out_ty=R.Tensor((16, 32), "float32"))
                z = R.add(residual, y)
                R.output(z)
            return z

    @I.ir_module
    class Expected:
        @T.prim_func(private=True)
        def w2a8_m16_n32_k64(q: T.Buffer((16, 64), "int8"), wp: T.Buffer((32, 16), "uint8"),
                             xs: T.Buffer((16, 1), "float32"), ws: T.Buffer((1,), "float32"),
                             out: T.Buffer((16, 32), "float32")):
            T.evaluate(0)

        @T.prim_func(private=True)
        def w2a8_m16_n32_k64_residual(q: T.Buffer((16, 64), "int8"), wp: T.Buffer((32, 16), "uint8"),
                                      xs: T.Buffer((16, 1), "float32"), ws: T.Buffer((1,), "float32"),
                                      res: T.Buffer((16, 32), "float32"), out: T.Buffer((16, 32), "float32")):
            T.evaluate(0)

        @R.function
        def main(q: R.Tensor((16, 64), "int8"), packed: R.Tensor((32, 16), "uint8"), x_scale: R.Tensor((16, 1), "float32"),
                 w_scale: R.Tensor((1,), "float32"), residual: R.Tensor((16, 32), "float32")) -> R.Tensor((16, 32), "float32"):
            cls = Expected
            with R.dataflow():
                _ = R.call_tir(cls.w2a8_m16_n32_k64, (q, packed, x_scale, w_scale), out_ty=R.Tensor((16, 32), "float32"))
                fused = R.call_tir(cls.w2a8_m16_n32_k64_residual,
                                   (q, packed, x_scale, w_scale, R.reshape(residual, (16, 32))),  # as an [M, N] operand
                                   out_ty=R.Tensor((16, 32), "float32"))
                z = fused
                R.output(z)
            return z

    plain, residual = (w2a8_compute(W2A8Config(16, 32, 64, e)) for e in ("none", "residual"))
    after = fuse_w2a8_epilogue(_with_kernels(Before, w2a8_m16_n32_k64=plain))
    assert json.loads(after.attrs[EPILOGUE_KEY]) == {"gelu": 0, "gelu_tanh": 0, "residual": 1, "bias": 0}
    tvm.ir.assert_structural_equal(after.without_attr(EPILOGUE_KEY),
                                   _with_kernels(Expected, w2a8_m16_n32_k64=plain, w2a8_m16_n32_k64_residual=residual))


def test_fuse_w2a8_epilogue_keeps_an_output_read_twice():
    @I.ir_module
    class Before:
        @T.prim_func(private=True)
        def w2a8_m16_n32_k64(q: T.Buffer((16, 64), "int8"), wp: T.Buffer((32, 16), "uint8"),
                             xs: T.Buffer((16, 1), "float32"), ws: T.Buffer((1,), "float32"),
                             out: T.Buffer((16, 32), "float32")):
            T.evaluate(0)

        @R.function
        def main(q: R.Tensor((16, 64), "int8"), packed: R.Tensor((32, 16), "uint8"),
                 x_scale: R.Tensor((16, 1), "float32"), w_scale: R.Tensor((1,), "float32")) -> R.Tensor((16, 32), "float32"):
            cls = Before
            with R.dataflow():
                y = R.call_tir(cls.w2a8_m16_n32_k64, (q, packed, x_scale, w_scale), out_ty=R.Tensor((16, 32), "float32"))
                z = R.add(R.nn.gelu(y), y)  # y is needed beside its GELU: the kernel must still write it
                R.output(z)
            return z

    before = _with_kernels(Before, w2a8_m16_n32_k64=w2a8_compute(W2A8Config(16, 32, 64)))
    after = fuse_w2a8_epilogue(before)
    assert json.loads(after.attrs[EPILOGUE_KEY]) == {"gelu": 0, "gelu_tanh": 0, "residual": 0, "bias": 0}
    tvm.ir.assert_structural_equal(after.without_attr(EPILOGUE_KEY), before)


def test_pad_w2a8_to_tiles_pads_operands_and_slices_the_output():
    cfg = W2A8Config(20, 40, 40, "residual")  # no axis a multiple of the default tiles
    knobs = w2a8_cuda.default_knobs(cfg)
    tiles = W2A8Config(32, 128, 128, "residual")  # M to block_m 16, N and K to block_n and block_k 128
    assert w2a8_cuda.padded(cfg, knobs) == tiles and w2a8_cuda.PACKED_ZERO == 0x55

    @I.ir_module
    class Before:
        @T.prim_func(private=True)
        def w2a8_m20_n40_k40_residual(q: T.Buffer((20, 40), "int8"), wp: T.Buffer((40, 10), "uint8"),
                                      xs: T.Buffer((20, 1), "float32"), ws: T.Buffer((1,), "float32"),
                                      res: T.Buffer((20, 40), "float32"), out: T.Buffer((20, 40), "float32")):
            T.evaluate(0)

        @R.function
        def main(q: R.Tensor((20, 40), "int8"), packed: R.Tensor((40, 10), "uint8"), x_scale: R.Tensor((20, 1), "float32"),
                 w_scale: R.Tensor((1,), "float32"), residual: R.Tensor((20, 40), "float32")) -> R.Tensor((20, 40), "float32"):
            cls = Before
            with R.dataflow():
                y = R.call_tir(cls.w2a8_m20_n40_k40_residual, (q, packed, x_scale, w_scale, residual),
                               out_ty=R.Tensor((20, 40), "float32"))
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @T.prim_func(private=True)
        def w2a8_tc_m32_n128_k128_residual(q: T.Buffer((32, 128), "int8"), wp: T.Buffer((8, 4, 128), "uint8"),
                                           xs: T.Buffer((32, 1), "float32"), ws: T.Buffer((1,), "float32"),
                                           res: T.Buffer((32, 128), "float32"), out: T.Buffer((32, 128), "float32")):
            T.evaluate(0)

        @R.function
        def main(q: R.Tensor((20, 40), "int8"), packed: R.Tensor((40, 10), "uint8"), x_scale: R.Tensor((20, 1), "float32"),
                 w_scale: R.Tensor((1,), "float32"), residual: R.Tensor((20, 40), "float32")) -> R.Tensor((20, 40), "float32"):
            cls = Expected
            with R.dataflow():  # padding that adds exactly 0: codes 0, weights 0x55 (four zero codes), scales 1
                qp = R.nn.pad(q, [0, 12, 0, 88], pad_value=0)
                wp = R.nn.pad(packed, [0, 88, 0, 22], pad_value=0x55)
                xp = R.nn.pad(x_scale, [0, 12, 0, 0], pad_value=1.0)
                rp = R.nn.pad(residual, [0, 12, 0, 88], pad_value=0.0)
                # TC_LAYOUT: the codes, in 16 x 32 blocks, each block's 512 codes gathered in tc_order and packed
                codes = R.bitwise_and(R.right_shift(R.expand_dims(wp, [-1]), R.const(SHIFTS)), R.const(3, "uint8"))
                blocks = R.permute_dims(R.reshape(codes, [8, 16, 4, 32]), [0, 2, 1, 3])
                slots = R.take(R.reshape(blocks, [8, 4, 512]), R.const(w2a8_cuda.tc_order()), axis=2, mode="clip")
                wt = R.sum(R.left_shift(slots, R.const(SHIFTS)), axis=[-1])
                tile = R.call_tir(cls.w2a8_tc_m32_n128_k128_residual, (qp, wt, xp, w_scale, rp),
                                  out_ty=R.Tensor((32, 128), "float32"))
                y = R.strided_slice(tile, axes=[0, 1], begin=[0, 0], end=[20, 40], assume_inbound=True)
                R.output(y)
            return y

    before = _with_kernels(Before, w2a8_m20_n40_k40_residual=w2a8_compute(cfg))
    kernel = w2a8_cuda.tc_compute(tiles).with_attr(PADDED_FROM_ATTR, {"config": vars(cfg), "knobs": vars(knobs)})
    tvm.ir.assert_structural_equal(_tiled(before), _with_kernels(Expected, w2a8_tc_m32_n128_k128_residual=kernel))


SHIFTS = np.array([0, 2, 4, 6], np.uint8)  # the 2-bit codes' offsets in a packed byte


def _tiled(mod: tvm.IRModule) -> tvm.IRModule:
    """`mod` through the GPU pipeline's passes from pad_w2a8_to_tiles on (the fold and the dead code elimination)."""
    listed = passes(device="cuda")
    start = [name for name, _ in listed].index("pad_w2a8_to_tiles")
    return tvm.transform.Sequential([p for _, p in listed[start:]])(mod)


def test_pad_w2a8_to_tiles_relays_out_an_aligned_kernels_weights():
    """Nothing to pad: the call keeps its operands but the packed weights, relaid out (TC_LAYOUT), and calls the
    tensor-core kernel's compute definition carrying its knobs; constant weights are relaid out at compile time."""
    cfg = W2A8Config(16, 32, 64)
    assert w2a8_cuda.padded(cfg, w2a8_cuda.default_knobs(cfg)) == cfg
    before = _w2a8_module(cfg)
    after = _tiled(before)
    (name,) = [gv.name_hint for gv in after.functions if gv.name_hint != "main"]
    assert name == "w2a8_tc_m16_n32_k64"
    knobs = vars(w2a8_cuda.default_knobs(cfg))
    tvm.ir.assert_structural_equal(after[name], w2a8_cuda.tc_compute(cfg).with_attr(
        PADDED_FROM_ATTR, {"config": vars(cfg), "knobs": knobs}))
    script = after["main"].script()
    assert "R.nn.pad" not in script and "R.strided_slice" not in script and "R.take" in script

    packed = np.random.default_rng(0).integers(0, 256, (cfg.n, cfg.k_packed), dtype=np.uint8)
    folded = _tiled(relax.transform.BindParams("main", {"packed": packed})(before))
    (call,) = [b.value for b in folded["main"].body.blocks[0].bindings]
    assert isinstance(call.args[1].fields[1], tvm.ir.GenericConst)  # fold_tiled_weights: no relayout at run time
    np.testing.assert_array_equal(call.args[1].fields[1].value.numpy(), w2a8_cuda.tc_pack(packed))


def test_pad_w2a8_to_tiles_keeps_a_call_of_another_primfunc():
    cfg = W2A8Config(20, 40, 40)  # unaligned: a W2A8 kernel of this shape would be padded
    before = _w2a8_module(cfg)
    name = "w2a8_m20_n40_k40"
    before.update_func(before.get_global_var(name), before[name].without_attr(KERNEL_ATTR))  # not a bmvcc kernel
    tvm.ir.assert_structural_equal(pad_w2a8_to_tiles(before), before)


def test_pipeline_passes_are_module_passes():
    for device in ("cpu", "cuda"):
        listed = passes(device=device)
        assert all(isinstance(p, tvm.transform.Pass) for _, p in listed)
        assert ("pad_w2a8_to_tiles" in dict(listed)) == (device == "cuda")
    wrapped = module_pass(drop_training_outputs)
    assert wrapped.info.name == "drop_training_outputs"


# ternary codes [N=4, K=8] and their 2-bit packing by hand: byte = sum((code_k + 1) << 2 * (k % 4)) over 4 k's
CODES = np.array([[1, 0, -1, 1, 0, 0, 0, 0], [-1, -1, -1, -1, 1, 1, 1, 1],
                  [0, 1, 0, -1, -1, 0, 1, 0], [1, 1, 0, 0, 0, -1, 1, -1]], np.float32)
PACKED = np.array([[134, 85], [0, 170], [25, 100], [90, 33]], np.uint8)


def _bitlinear(weight: np.ndarray) -> tvm.IRModule:
    """A BitLinear as torch.export leaves it (weight math folded): absmax int8 quantization of x, matmul by `weight`."""
    w = relax.const(weight)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 8), "float32")) -> R.Tensor((2, 4), "float32"):
            with R.dataflow():
                absmax = R.max(R.abs(x), axis=[-1], keepdims=True)
                clamped = R.clip(absmax, T.float32(1e-5), T.float32("inf"))
                s = R.divide(R.const(127.0, "float32"), clamped)
                q = R.clip(R.round(R.multiply(x, s)), -128, 127)
                y = R.matmul(R.divide(q, s), w)
                R.output(y)
            return y

    return Before


def test_quantize_bitlinear():
    packed, w_scale = relax.const(PACKED), relax.const(np.array([0.25], np.float32))

    @I.ir_module
    class Expected:
        @T.prim_func(private=True)
        def w2a8_m2_n4_k8(q: T.Buffer((2, 8), "int8"), wp: T.Buffer((4, 2), "uint8"),
                          xs: T.Buffer((2, 1), "float32"), ws: T.Buffer((1,), "float32"),
                          out: T.Buffer((2, 4), "float32")):
            T.evaluate(0)

        @R.function
        def main(x: R.Tensor((2, 8), "float32")) -> R.Tensor((2, 4), "float32"):
            cls = Expected
            with R.dataflow():
                absmax = R.max(R.abs(x), axis=[-1], keepdims=True)
                clamped = R.clip(absmax, T.float32(1e-5), T.float32("inf"))
                s = R.divide(R.const(127.0, "float32"), clamped)
                q = R.clip(R.round(R.multiply(x, s)), -128, 127)
                _ = R.divide(q, s)  # the float activation, dead now
                q8 = R.astype(R.reshape(q, (2, 8)), "int8")
                x_scale = R.reshape(R.divide(R.const(127.0, "float32"), clamped), (2, 1))  # 1 / (1 / s)
                y = R.call_tir(cls.w2a8_m2_n4_k8, (q8, packed, x_scale, w_scale), out_ty=R.Tensor((2, 4), "float32"))
                R.output(y)
            return y

    after = quantize_bitlinear(_bitlinear(0.25 * CODES.T))
    assert json.loads(after.attrs[QUANTIZE_KEY]) == {
        "rewritten": [{"name": "matmul 'y'", "in": 8, "out": 4}], "not_rewritten": []}
    tvm.ir.assert_structural_equal(after.without_attr(QUANTIZE_KEY),
                                   _with_kernels(Expected, w2a8_m2_n4_k8=w2a8_compute(W2A8Config(2, 4, 8))))


def test_quantize_bitlinear_keeps_a_weight_that_is_not_ternary():
    weight = 0.25 * CODES.T
    weight[0, 0] = 0.125  # one weight between the codes
    before = _bitlinear(weight)
    after = quantize_bitlinear(before)
    (refused,) = json.loads(after.attrs[QUANTIZE_KEY])["not_rewritten"]
    assert refused["name"] == "matmul 'y'" and "not ternary codes times one scale" in refused["reason"]
    tvm.ir.assert_structural_equal(after.without_attr(QUANTIZE_KEY), before)


def _norm_then_w2a8(clip_low: int):
    """RMSNorm (gain g), absmax int8 quantization clipped to [clip_low, 127], a W2A8 call on the codes."""
    g = relax.const(np.linspace(0.5, 1.5, 8, dtype=np.float32))
    packed, w_scale = relax.const(PACKED), relax.const(np.array([0.25], np.float32))

    @I.ir_module
    class Before:
        @T.prim_func(private=True)
        def w2a8_m2_n4_k8(q: T.Buffer((2, 8), "int8"), wp: T.Buffer((4, 2), "uint8"),
                          xs: T.Buffer((2, 1), "float32"), ws: T.Buffer((1,), "float32"),
                          out: T.Buffer((2, 4), "float32")):
            T.evaluate(0)

        @R.function
        def main(x: R.Tensor((2, 8), "float32")) -> R.Tensor((2, 4), "float32"):
            cls = Before
            with R.dataflow():
                rstd = R.rsqrt(R.add(R.mean(R.multiply(x, x), axis=[-1], keepdims=True), R.const(1e-5, "float32")))
                xn = R.multiply(R.multiply(x, rstd), g)
                absmax = R.max(R.abs(xn), axis=[-1], keepdims=True)
                s = R.divide(R.const(127.0, "float32"), R.clip(absmax, T.float32(1e-5), T.float32("inf")))
                q = R.astype(R.clip(R.round(R.multiply(xn, s)), clip_low, 127), "int8")
                y = R.call_tir(cls.w2a8_m2_n4_k8, (q, packed, s, w_scale), out_ty=R.Tensor((2, 4), "float32"))
                R.output(y)
            return y

    return _with_kernels(Before, w2a8_m2_n4_k8=w2a8_compute(W2A8Config(2, 4, 8))), (g, packed, w_scale)


def test_fuse_norm_quant():
    before, (g, packed, w_scale) = _norm_then_w2a8(-128)

    @I.ir_module
    class Expected:
        @T.prim_func(private=True)
        def w2a8_m2_n4_k8(q: T.Buffer((2, 8), "int8"), wp: T.Buffer((4, 2), "uint8"),
                          xs: T.Buffer((2, 1), "float32"), ws: T.Buffer((1,), "float32"),
                          out: T.Buffer((2, 4), "float32")):
            T.evaluate(0)

        @T.prim_func(private=True)
        def norm_quant_m2_k8(x: T.Buffer((2, 8), "float32"), g: T.Buffer((8,), "float32"),
                             q: T.Buffer((2, 8), "int8"), xs: T.Buffer((2, 1), "float32")):
            T.evaluate(0)

        @R.function
        def main(x: R.Tensor((2, 8), "float32")) -> R.Tensor((2, 4), "float32"):
            cls = Expected
            with R.dataflow():  # the float norm and quantization stay until dead_code_elimination
                rstd = R.rsqrt(R.add(R.mean(R.multiply(x, x), axis=[-1], keepdims=True), R.const(1e-5, "float32")))
                xn = R.multiply(R.multiply(x, rstd), g)
                absmax = R.max(R.abs(xn), axis=[-1], keepdims=True)
                s = R.divide(R.const(127.0, "float32"), R.clip(absmax, T.float32(1e-5), T.float32("inf")))
                _ = R.astype(R.clip(R.round(R.multiply(xn, s)), -128, 127), "int8")
                nq = R.call_tir(cls.norm_quant_m2_k8, (R.reshape(x, (2, 8)), g),
                                out_ty=[R.Tensor((2, 8), "int8"), R.Tensor((2, 1), "float32")])
                y = R.call_tir(cls.w2a8_m2_n4_k8, (nq[0], packed, nq[1], w_scale), out_ty=R.Tensor((2, 4), "float32"))
                R.output(y)
            return y

    eps = float(np.float32(1e-5))  # both epsilons as the float32 constants of the graph
    expected = _with_kernels(Expected, w2a8_m2_n4_k8=w2a8_compute(W2A8Config(2, 4, 8)),
                             norm_quant_m2_k8=norm_quant_compute(NormQuantConfig(2, 8, eps, eps)))
    after = fuse_norm_quant(before)
    assert json.loads(after.attrs[NORM_QUANT_KEY]) == {"fused": 1, "unfused": 0}
    tvm.ir.assert_structural_equal(after.without_attr(NORM_QUANT_KEY), expected)


def test_fuse_norm_quant_keeps_codes_clipped_to_another_range():
    before, _ = _norm_then_w2a8(-127)  # symmetric int8: not the kernel's [-128, 127]
    after = fuse_norm_quant(before)
    assert json.loads(after.attrs[NORM_QUANT_KEY]) == {"fused": 0, "unfused": 1}
    tvm.ir.assert_structural_equal(after.without_attr(NORM_QUANT_KEY), before)


def _causal_attention(mask: np.ndarray) -> tvm.IRModule:
    """softmax(Q K^T / sqrt(8) + mask) V for 2 heads of 8 tokens x 8 dims."""
    scale, additive = relax.const(np.float32(1 / np.sqrt(8))), relax.const(mask)

    @I.ir_module
    class Before:
        @R.function
        def main(q: R.Tensor((2, 8, 8), "float32"), kt: R.Tensor((2, 8, 8), "float32"),
                 v: R.Tensor((2, 8, 8), "float32")) -> R.Tensor((2, 8, 8), "float32"):
            with R.dataflow():
                p = R.nn.softmax(R.add(R.multiply(R.matmul(q, kt), scale), additive), axis=-1)
                o = R.matmul(p, v)
                R.output(o)
            return o

    return Before


CAUSAL = np.triu(np.full((8, 8), -np.inf, np.float32), 1)  # 0 on and below the diagonal


def test_fuse_causal_attention():
    scale, additive = relax.const(np.float32(1 / np.sqrt(8))), relax.const(CAUSAL)

    @I.ir_module
    class Expected:
        @T.prim_func(private=True)
        def causal_attention_g2_kv2_n8_d8(q: T.Buffer((2, 8, 8), "float32"), kt: T.Buffer((2, 8, 8), "float32"),
                                          v: T.Buffer((2, 8, 8), "float32"), out: T.Buffer((2, 8, 8), "float32")):
            T.evaluate(0)

        @R.function
        def main(q: R.Tensor((2, 8, 8), "float32"), kt: R.Tensor((2, 8, 8), "float32"),
                 v: R.Tensor((2, 8, 8), "float32")) -> R.Tensor((2, 8, 8), "float32"):
            cls = Expected
            with R.dataflow():
                _ = R.nn.softmax(R.add(R.multiply(R.matmul(q, kt), scale), additive), axis=-1)  # dead now
                out = R.call_tir(cls.causal_attention_g2_kv2_n8_d8,
                                 (R.reshape(q, (2, 8, 8)), R.reshape(kt, (2, 8, 8)), R.reshape(v, (2, 8, 8))),
                                 out_ty=R.Tensor((2, 8, 8), "float32"))
                o = R.reshape(out, (2, 8, 8))
                R.output(o)
            return o

    cfg = AttentionConfig(groups=2, kv_groups=2, tokens=8, head_dim=8, scale=float(np.float32(1 / np.sqrt(8))))
    after = fuse_causal_attention(_causal_attention(CAUSAL))
    assert json.loads(after.attrs[ATTENTION_KEY]) == {"fused": 1, "bf16": 0}
    tvm.ir.assert_structural_equal(after.without_attr(ATTENTION_KEY),
                                   _with_kernels(Expected, causal_attention_g2_kv2_n8_d8=attention_cpu(cfg)))


SCALE = float(np.float32(1 / np.sqrt(8)))


def _multi_query_attention(mask: np.ndarray) -> tvm.IRModule:
    """softmax(Q K^T / sqrt(8) + mask) V as passes/fp16_matmuls.py leaves it for CUDA (fp16 operands, float32
    scores and softmax): 4 query heads of 8 tokens x 8 dims, one K/V head broadcast by the matmuls."""
    scale, additive = relax.const(np.float32(SCALE)), relax.const(mask)

    @I.ir_module
    class Before:
        @R.function
        def main(q: R.Tensor((1, 4, 8, 8), "float16"), kt: R.Tensor((1, 1, 8, 8), "float16"),
                 v: R.Tensor((1, 1, 8, 8), "float16")) -> R.Tensor((1, 4, 8, 8), "float32"):
            with R.dataflow():
                x = R.add(R.multiply(R.matmul(q, kt, out_dtype="float32"), scale), additive)
                p = R.astype(R.nn.softmax(x, axis=-1), "float16")
                o = R.matmul(p, v, out_dtype="float32")
                R.output(o)
            return o

    return Before


def test_fuse_attention_cuda_causal_multi_query():
    """The mask becomes the kernel's causal condition; the K/V head enters once for all 4 query heads
    ([B, N, H, D] layout: one batch entry, 4 heads, 1 K/V head)."""
    scale, additive = relax.const(np.float32(SCALE)), relax.const(CAUSAL)

    @I.ir_module
    class Expected:
        @T.prim_func(private=True)
        def attention_causal_b1_h4_n8_d8(q: T.Buffer((1, 8, 4, 8), "float16"), k: T.Buffer((1, 8, 1, 8), "float16"),
                                         v: T.Buffer((1, 8, 1, 8), "float16"), out: T.Buffer((1, 8, 4, 8), "float16"),
                                         lse: T.Buffer((1, 8, 4), "float16")):
            T.evaluate(0)

        @R.function
        def main(q: R.Tensor((1, 4, 8, 8), "float16"), kt: R.Tensor((1, 1, 8, 8), "float16"),
                 v: R.Tensor((1, 1, 8, 8), "float16")) -> R.Tensor((1, 4, 8, 8), "float32"):
            cls = Expected
            with R.dataflow():
                x = R.add(R.multiply(R.matmul(q, kt, out_dtype="float32"), scale), additive)
                _ = R.astype(R.nn.softmax(x, axis=-1), "float16")  # dead now
                q4 = R.permute_dims(R.reshape(q, (1, 4, 8, 8)), axes=[0, 2, 1, 3])
                k4 = R.reshape(R.permute_dims(R.reshape(kt, (1, 8, 8)), axes=[0, 2, 1]), (1, 8, 1, 8))
                out = R.call_tir(cls.attention_causal_b1_h4_n8_d8, (q4, k4, R.reshape(v, (1, 8, 1, 8))),
                                 out_ty=[R.Tensor((1, 8, 4, 8), "float16"), R.Tensor((1, 8, 4), "float16")])
                o = R.reshape(R.astype(R.permute_dims(out[0], axes=[0, 2, 1, 3]), "float32"), (1, 4, 8, 8))
                R.output(o)
            return o

    after = fuse_attention_cuda(_multi_query_attention(CAUSAL))
    assert json.loads(after.attrs[ATTENTION_KEY]) == {"fused": 1}
    cfg = PrefillConfig(batch=1, heads=4, kv_heads=1, tokens=8, head_dim=8, scale=SCALE, causal=True)
    tvm.ir.assert_structural_equal(after.without_attr(ATTENTION_KEY),
                                   _with_kernels(Expected, attention_causal_b1_h4_n8_d8=attention_compute(cfg)))


def test_fuse_attention_cuda_unmasked_multi_head():
    """softmax(Q K^T / sqrt(8)) V, 2 heads with their own K/V: the kernel without the causal condition, one
    batch entry per head."""
    scale = relax.const(np.float32(SCALE))

    @I.ir_module
    class Before:
        @R.function
        def main(q: R.Tensor((2, 8, 8), "float16"), kt: R.Tensor((2, 8, 8), "float16"),
                 v: R.Tensor((2, 8, 8), "float16")) -> R.Tensor((2, 8, 8), "float32"):
            with R.dataflow():
                p = R.astype(R.nn.softmax(R.multiply(R.matmul(q, kt, out_dtype="float32"), scale), axis=-1), "float16")
                o = R.matmul(p, v, out_dtype="float32")
                R.output(o)
            return o

    @I.ir_module
    class Expected:
        @T.prim_func(private=True)
        def attention_full_b2_h1_n8_d8(q: T.Buffer((2, 8, 1, 8), "float16"), k: T.Buffer((2, 8, 1, 8), "float16"),
                                       v: T.Buffer((2, 8, 1, 8), "float16"), out: T.Buffer((2, 8, 1, 8), "float16"),
                                       lse: T.Buffer((2, 8, 1), "float16")):
            T.evaluate(0)

        @R.function
        def main(q: R.Tensor((2, 8, 8), "float16"), kt: R.Tensor((2, 8, 8), "float16"),
                 v: R.Tensor((2, 8, 8), "float16")) -> R.Tensor((2, 8, 8), "float32"):
            cls = Expected
            with R.dataflow():
                _ = R.astype(R.nn.softmax(R.multiply(R.matmul(q, kt, out_dtype="float32"), scale), axis=-1), "float16")
                q4 = R.permute_dims(R.reshape(q, (2, 1, 8, 8)), axes=[0, 2, 1, 3])
                k4 = R.reshape(R.permute_dims(R.reshape(kt, (2, 8, 8)), axes=[0, 2, 1]), (2, 8, 1, 8))
                out = R.call_tir(cls.attention_full_b2_h1_n8_d8, (q4, k4, R.reshape(v, (2, 8, 1, 8))),
                                 out_ty=[R.Tensor((2, 8, 1, 8), "float16"), R.Tensor((2, 8, 1), "float16")])
                o = R.reshape(R.astype(R.permute_dims(out[0], axes=[0, 2, 1, 3]), "float32"), (2, 8, 8))
                R.output(o)
            return o

    after = fuse_attention_cuda(Before)
    assert json.loads(after.attrs[ATTENTION_KEY]) == {"fused": 1}
    cfg = PrefillConfig(batch=2, heads=1, kv_heads=1, tokens=8, head_dim=8, scale=SCALE, causal=False)
    tvm.ir.assert_structural_equal(after.without_attr(ATTENTION_KEY),
                                   _with_kernels(Expected, attention_full_b2_h1_n8_d8=attention_compute(cfg)))


@pytest.mark.parametrize("fuse, attention", [(fuse_causal_attention, _causal_attention),
                                             (fuse_attention_cuda, _multi_query_attention)])
def test_fuse_attention_keeps_a_mask_that_lets_a_token_see_the_next(fuse, attention):
    """Neither causal nor absent: dropping it would change the result, so the module comes out unchanged."""
    before = attention(np.triu(np.full((8, 8), -np.inf, np.float32), 2))
    after = fuse(before)
    assert json.loads(after.attrs[ATTENTION_KEY])["fused"] == 0
    tvm.ir.assert_structural_equal(after.without_attr(ATTENTION_KEY), before)


def _guarded_softmax(fill: np.ndarray, keys: int = 8) -> tvm.IRModule:
    """torch SDPA's guard as TVM imports it, after fold_constants: where(row all -inf, fill, softmax(s)), s of
    `keys` columns."""
    fill = relax.const(fill)

    @I.ir_module
    class Before:
        @R.function
        def main(none_seen: R.Tensor((2, 8, 1), "bool"), s: R.Tensor((2, 8, keys), "float32")):
            with R.dataflow():
                p = R.where(none_seen, fill, R.nn.softmax(s, axis=-1))
                R.output(p)
            return p

    return Before


def test_scalar_fills():
    @I.ir_module
    class Expected:
        @R.function
        def main(none_seen: R.Tensor((2, 8, 1), "bool"), s: R.Tensor((2, 8, 8), "float32")):
            with R.dataflow():
                p = R.where(none_seen, R.const(0.0, "float32"), R.nn.softmax(s, axis=-1))
                R.output(p)
            return p

    tvm.ir.assert_structural_equal(scalar_fills(_guarded_softmax(np.zeros((2, 8, 8), np.float32))), Expected)


def test_scalar_fills_keeps_a_branch_of_different_values():
    fill = np.zeros((2, 8, 8), np.float32)
    fill[1, 7, 7] = -0.0  # == 0.0, but not the same element to a where that copies it
    before = _guarded_softmax(fill)
    tvm.ir.assert_structural_equal(scalar_fills(before), before)


def test_scalar_fills_keeps_a_branch_that_gives_the_shape():
    before = _guarded_softmax(np.zeros((2, 8, 8), np.float32), keys=1)  # [2, 8, 1] and [2, 8, 1]: the fill gives 8
    tvm.ir.assert_structural_equal(scalar_fills(before), before)


def _weight_matmul(rows, weight: np.ndarray) -> tvm.IRModule:
    """main(x) = matmul(x, weight) with fp32 accumulation, the weight a constant (as fp16_matmuls leaves one); x has
    `rows` rows, or leading axes of those extents (a tuple)."""
    w = relax.const(weight)
    lead = tuple(rows) if isinstance(rows, tuple) else (rows,)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((*lead, weight.shape[0]), weight.dtype)):
            with R.dataflow():
                y = R.matmul(x, w, out_dtype="float32")
                R.output(y)
            return y

    return Before


def test_transpose_matmul_weights_stores_the_weight_n_by_k_padded_to_4():
    """W [K=70, N=72] -> its transpose [72, 72] with 2 zero columns, x padded by 2 zero columns; built for the host,
    the same product as numpy's (fp16 operands are exact in float32, so only the order of 70 float32 additions
    differs: at most ~70 x 2^-24 relative to the sum of |products|)."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((70, 72)).astype("float16")
    padded = np.zeros((72, 72), "float16")
    padded[:, :70] = weight.T
    wt = relax.const(padded)

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((65, 70), "float16")):
            with R.dataflow():
                xp = R.nn.pad(x, [0, 0, 0, 2])
                w = R.permute_dims(wt, axes=[1, 0])
                y = R.matmul(xp, w, out_dtype="float32")
                R.output(y)
            return y

    after = transpose_matmul_weights(_weight_matmul(65, weight))
    tvm.ir.assert_structural_equal(after, Expected)
    x = rng.standard_normal((65, 70)).astype("float16")
    host = tvm.target.Target("llvm")
    vm = relax.VirtualMachine(tvm.compile(after, target=host), tvm.cpu())
    ref = x.astype("float32") @ weight.astype("float32")
    bound = 70 * 2.0**-24 * (np.abs(x.astype("float32")) @ np.abs(weight.astype("float32")))
    assert np.all(np.abs(vm["main"](tvm.runtime.tensor(x)).numpy() - ref) <= bound)


@pytest.mark.parametrize("rows, dtype", [(64, "float16"), (65, "float32")])
def test_transpose_matmul_weights_keeps_a_matmul_dlight_runs_on_cuda_cores(rows, dtype):
    """64 rows (not above DLight's tensor-core threshold) or a float32 weight (not a tensor-core operand)."""
    before = _weight_matmul(rows, np.ones((72, 72), dtype))
    tvm.ir.assert_structural_equal(transpose_matmul_weights(before), before)

def test_transpose_matmul_weights_counts_every_leading_axis_of_x_as_rows():
    """x [2, 49, K] against a 2-D weight: DLight's rule sees 98 rows (an axis is its batch only when both operands
    have it), above its threshold, so the weight is stored [N, K]."""
    before = _weight_matmul((2, 49), np.ones((72, 72), "float16"))
    after = transpose_matmul_weights(before)
    assert "R.permute_dims" in after.script() and "R.permute_dims" not in before.script()


def test_rewriting_passes_leave_their_input_unchanged():
    """The near-miss tests compare a pass's output with its input: only meaningful if a pass that rewrites builds a
    new module (a PyExprMutator's BlockBuilder holds the module it is given, copied only when a function is added,
    and the pass replaces main in it)."""
    for rewrite, before in [(scalar_fills, _guarded_softmax(np.zeros((2, 8, 8), np.float32))),
                            (fp16_matmuls, _causal_attention(CAUSAL)),
                            (transpose_matmul_weights, _weight_matmul(65, np.ones((72, 72), "float16")))]:
        text = before.script(show_meta=True)
        assert rewrite(before).script(show_meta=True) != text
        assert before.script(show_meta=True) == text, rewrite.__name__
