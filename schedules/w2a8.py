"""W2A8: int8 activations x 2-bit packed ternary weights, int32 accumulation, float epilogue.

This file is the contract between the passes and every backend's schedule:
- `pack_ternary` / `unpack_ternary` define the packed weight layout;
- `W2A8Config` names one kernel instance;
- `w2a8_compute` is the reference compute definition (TIR, unscheduled) the passes call and every
  schedule (schedules/w2a8_*.py) transforms; `w2a8_numpy` is its independent numpy reference.

Packed layout (row-major over output features n, 4 codes per byte, low bits first; the CUDA kernel's weights
are relaid out at compile time in its own, schedules/w2a8_cuda.py's TC_LAYOUT):
    u[n, k] = T[n, k] + 1 in {0, 1, 2}            (T ternary in {-1, 0, +1}; 3 never occurs)
    packed[n, k // 4] |= u[n, k] << (2 * (k % 4))  -> uint8[N, ceil(K / 4)]
K is padded to a multiple of 4 with u = 1 (T = 0), which adds nothing to the dot product.

Math: acc[m, n] = sum_k q[m, k] * T[n, k] (exact in int32), out[m, n] = acc * w_scale / x_scale[m]
where x_scale = 127 / max|xn| per token and w_scale = mean|W| (= 1 / s_w) per tensor.
Epilogues (applied to out before its one store): "gelu" (erf), "gelu_tanh", "residual" (+ res[m, n]),
and "bias", "bias_gelu", "bias_gelu_tanh": + bias[0, n] first (a Linear's bias; with a residual add
after it the pass folds the bias into the residual operand instead).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np

KERNEL_ATTR = "bmvcc.kernel"  # PrimFunc attribute naming a bmvcc kernel's kind; schedules dispatch on it
EPILOGUES = ("none", "gelu", "gelu_tanh", "residual", "bias", "bias_gelu", "bias_gelu_tanh")


def epilogue_operand(epilogue: str) -> str | None:
    """The extra input an epilogue reads after x_scale and w_scale: "residual" (float32[M, N]),
    "bias" (float32[1, N]) or None."""
    return "bias" if epilogue.startswith("bias") else "residual" if epilogue == "residual" else None


def pack_ternary(codes: np.ndarray) -> np.ndarray:
    """int codes T[N, K] in {-1, 0, 1} -> uint8[N, ceil(K/4)] in the layout above."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or np.abs(codes).max(initial=0) > 1:
        raise ValueError("pack_ternary expects a 2-D array of codes in {-1, 0, 1}")
    n, k = codes.shape
    u = np.ones((n, -(-k // 4) * 4), np.uint8)
    u[:, :k] = (codes + 1).astype(np.uint8)
    u = u.reshape(n, -1, 4)
    return u[..., 0] | (u[..., 1] << 2) | (u[..., 2] << 4) | (u[..., 3] << 6)


def unpack_ternary(packed: np.ndarray, k: int) -> np.ndarray:
    """Inverse of pack_ternary: uint8[N, ceil(K/4)] -> int8 T[N, K]."""
    shifts = np.array([0, 2, 4, 6], np.uint8)
    u = (packed[..., None] >> shifts) & 3
    return (u.reshape(packed.shape[0], -1)[:, :k].astype(np.int8) - 1)


@dataclass(frozen=True)
class W2A8Config:
    m: int  # rows (tokens x batch)
    n: int  # output features
    k: int  # input features
    epilogue: str = "none"  # "none" | "gelu" | "residual" (out + residual[m, n])

    @property
    def k_packed(self) -> int:
        return -(-self.k // 4)


def w2a8_numpy(q: np.ndarray, packed: np.ndarray, x_scale: np.ndarray, w_scale: float, k: int,
               epilogue: str = "none", residual: np.ndarray | None = None) -> np.ndarray:
    """Reference: q int8[M, K], packed uint8[N, K/4], x_scale float32[M, 1] -> float32[M, N];
    `residual` is the epilogue's extra operand (the residual, or the bias [1, N])."""
    acc = q.astype(np.int64) @ unpack_ternary(packed, k).astype(np.int64).T
    out = (acc.astype(np.float32) * np.float32(w_scale)) / x_scale.astype(np.float32)
    if epilogue.startswith("bias"):
        out = out + residual.astype(np.float32)
    if epilogue.endswith("gelu"):
        erf = np.vectorize(math.erf)(out.astype(np.float64) / math.sqrt(2.0))
        return (0.5 * out * (1.0 + erf)).astype(np.float32)
    if epilogue.endswith("gelu_tanh"):
        o = out.astype(np.float64)
        return (0.5 * o * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (o + 0.044715 * o**3)))).astype(np.float32)
    if epilogue == "residual":
        return residual.astype(np.float32) + out
    return out


# erf(x) ~= x * P(x^2) / Q(x^2) on [-4, 4] (clamped outside), the float32 rational approximation
# TVM's FastMathTransform uses for the float GELU (Eigen's); max error ~1e-7 against math.erf.
# libm's erff is a scalar call per element that costs 8x the whole int8 GEMM, and does not vectorize.
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)


def _fast_erf(T, x, divide):
    x = T.max(T.min(x, T.float32(4.0)), T.float32(-4.0))
    x2 = x * x
    p, q = T.float32(_ERF_P[0]), T.float32(_ERF_Q[0])
    for c in _ERF_P[1:]:
        p = p * x2 + T.float32(c)
    for c in _ERF_Q[1:]:
        q = q * x2 + T.float32(c)
    return divide(x * p, q)


def apply_epilogue(epilogue: str, v, res, vi, vj, divide=operator.truediv):
    """The "dequant" block's value from the dequantized accumulator v (a TIR expression) at [vi, vj]:
    + bias res[0, vj] first for the bias epilogues, then erf GELU spelled as Relax legalizes nn.gelu,
    tanh GELU as it legalizes nn.gelu_tanh, or res[vi, vj] + v. Schedules' tensor intrinsics build
    their descriptions with it, so they match the block structurally; their implementations may pass another
    `divide(a, b)` for the erf's one division of two TIR expressions."""
    from tvm.script import tirx as T

    if epilogue.startswith("bias"):
        v = v + res[vi * 0, vj]  # row 0 of the [1, N] bias (vi * 0 keeps the index's dtype)
    if epilogue.endswith("gelu"):
        return v * (T.float32(0.5) + _fast_erf(T, v * T.float32(0.7071067811865476), divide) * T.float32(0.5))
    if epilogue.endswith("gelu_tanh"):
        return T.float32(0.5) * v * (T.float32(1) + T.tanh(T.float32(0.7978845608028654) * v * (
            T.float32(1) + T.float32(0.044715) * v * v)))
    if epilogue == "residual":
        return res[vi, vj] + v
    return v


def w2a8_compute(cfg: W2A8Config, layout=None):
    """Unscheduled TIR PrimFunc (q, packed, x_scale, w_scale[, residual]) -> out float32[M, N].

    Two blocks in every variant: "acc" (int32 reduction) then "dequant", which applies the
    epilogue in place (see EPILOGUES; "residual" and the bias epilogues read an extra input).
    `layout` replaces the packed layout above by another one a backend chooses at compile time
    (schedules/w2a8_cuda.py's TC_LAYOUT): its `shape(n, k)` is the packed buffer's, its `locate(wp, n, k)`
    the byte of wp holding code u[n, k] and the code's bit offset in it.

    Indices are int64 throughout and the function is opaque (op_pattern 8), so Relax fusion and
    DLight leave it to bmvcc's schedules.
    """
    from tvm.script import tirx as T

    M, N, K, KP = (T.int64(v) for v in (cfg.m, cfg.n, cfg.k, cfg.k_packed))
    WP = (N, KP) if layout is None else tuple(T.int64(v) for v in layout.shape(cfg.n, cfg.k))

    def decode(wp, vj, vk):
        """The weight T[vj, vk] of the packed buffer wp (ternary_weight: the decode tensor intrinsics match)."""
        if layout is None:
            byte, shift = wp[vj, vk // T.int64(4)], (vk % T.int64(4)) * T.int64(2)
        else:
            byte, shift = layout.locate(wp, vj, vk)
        return ternary_weight(byte, shift)

    @T.macro
    def body(q, wp, xs, ws, res, out):
        acc = T.sblock_alloc_buffer((M, N), "int32")
        for i, j, k in T.grid(M, N, K):
            with T.sblock("acc"):
                vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                with T.init():
                    acc[vi, vj] = 0
                acc[vi, vj] = acc[vi, vj] + T.Cast("int32", q[vi, vk]) * decode(wp, vj, vk)
        for i, j in T.grid(M, N):
            with T.sblock("dequant"):
                vi, vj = T.axis.remap("SS", [i, j])
                out[vi, vj] = apply_epilogue(cfg.epilogue, T.Cast("float32", acc[vi, vj]) * ws[T.int64(0)]
                                             / xs[vi, T.int64(0)], res, vi, vj)

    if cfg.epilogue not in EPILOGUES:
        raise ValueError(f"unknown W2A8 epilogue {cfg.epilogue!r}; use one of {EPILOGUES}")
    operand = epilogue_operand(cfg.epilogue)
    if operand is None:

        @T.prim_func(private=True, s_tir=True)
        def w2a8(q: T.Buffer((M, K), "int8"), wp: T.Buffer(WP, "uint8"),
                 xs: T.Buffer((M, T.int64(1)), "float32"), ws: T.Buffer((T.int64(1),), "float32"),
                 out: T.Buffer((M, N), "float32")):
            T.func_attr({"tirx.noalias": True, "op_pattern": 8, KERNEL_ATTR: "w2a8"})
            body(q, wp, xs, ws, None, out)

        return w2a8.with_attr(CONFIG_ATTR, vars(cfg))

    rows = M if operand == "residual" else T.int64(1)

    @T.prim_func(private=True, s_tir=True)
    def w2a8_residual(q: T.Buffer((M, K), "int8"), wp: T.Buffer(WP, "uint8"),
                      xs: T.Buffer((M, T.int64(1)), "float32"), ws: T.Buffer((T.int64(1),), "float32"),
                      res: T.Buffer((rows, N), "float32"), out: T.Buffer((M, N), "float32")):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8, KERNEL_ATTR: "w2a8"})
        body(q, wp, xs, ws, res, out)

    return w2a8_residual.with_attr(CONFIG_ATTR, vars(cfg))


# Below w2a8_compute: device_definitions.json records the source lines of its TVMScript (spans), so lines
# added above it would change GPU artifacts.
CONFIG_ATTR = "bmvcc.config"  # PrimFunc attribute: the configuration it was built from ({field: value})


def packed_code(byte, shift):
    """int32 code u = T + 1 of a packed weight: bits shift..shift+1 of `byte` (TIR uint8, the layout of the module
    docstring or a backend's, which locates the byte and shift), (byte >> shift) & 3."""
    from tvm.script import tirx as T

    return T.Cast("int32", T.bitwise_and(T.shift_right(byte, T.Cast("uint8", shift)), T.uint8(3)))


def ternary_weight(byte, shift):
    """int32 weight T = u - 1 of a packed byte: w2a8_compute's decode, which a tensor intrinsic's description
    (schedules/cuda_intrinsics.py) must match structurally, so both call this."""
    return packed_code(byte, shift) - 1


def kernel_of(func) -> str | None:
    """The bmvcc kernel kind of a PrimFunc (attr KERNEL_ATTR), else None (also for any other function)."""
    from tvm import tirx

    attrs = func.attrs if isinstance(func, tirx.PrimFunc) else None
    return str(attrs[KERNEL_ATTR]) if attrs is not None and KERNEL_ATTR in attrs else None


def with_kernel_attrs(kernel, func):
    """`kernel`, a hand schedule of the unscheduled PrimFunc `func`, with `func`'s kernel attributes (noalias,
    op_pattern, KERNEL_ATTR, CONFIG_ATTR)."""
    for key in ("tirx.noalias", "op_pattern", KERNEL_ATTR, CONFIG_ATTR):
        kernel = kernel.with_attr(key, func.attrs[key])
    return kernel


def config_of(func) -> W2A8Config:
    """The W2A8Config a w2a8_compute PrimFunc (scheduled or not) was built from (attr CONFIG_ATTR)."""
    return W2A8Config(**attr_value(func.attrs[CONFIG_ATTR]))


def attr_value(value):
    """A TVM attribute value (Map, Array, String, int) as plain Python (dict, list, str, int)."""
    if hasattr(value, "items"):
        return {str(k): attr_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "Array":
        return [attr_value(v) for v in value]
    return str(value) if isinstance(value, str) else value
