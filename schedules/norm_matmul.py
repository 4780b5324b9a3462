"""norm_matmul: a LayerNorm whose output only a matmul reads (e.g. the pre-attention norm and a QKV projection), in
one kernel.

For x float32[M, K], gamma and beta float32[K], w float16[K, N] and bias float32[N], per row m, exactly what the
unfused GPU path computes (TVM's layer_norm legalization, passes/fp16_matmuls.py's fp16 matmul):
    mean   = sum_k(x) / K
    y      = fp16((x - mean) * rsqrt(sum_k((x - mean)^2) / K + eps) * gamma + beta)
    out    = out_dtype(sum_k(float32(y_k) * float32(w_kn)) + bias_n)       (float32 accumulation)
`norm_matmul_compute` is the compute definition (unscheduled: bmvcc verify's reference and what an llvm build of
the GPU pipeline runs); passes/fuse_norm_matmul.py makes the calls, schedules/norm_matmul_cuda.py schedules them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .w2a8 import CONFIG_ATTR, KERNEL_ATTR

KIND = "norm_matmul"
DTYPE = "float16"  # the matmul's operands


@dataclass(frozen=True)
class NormMatmulConfig:
    m: int  # rows (tokens x batch)
    k: int  # features normalized, the matmul's reduction
    n: int  # output columns
    eps: float = 1e-5
    out_dtype: str = "float32"  # the dtype the consumer reads (float16: the projection's cast folded in)


def norm_matmul_compute(cfg: NormMatmulConfig):
    """Unscheduled PrimFunc (x, gamma, beta, w, bias, out) as in the module docstring; opaque (op_pattern 8), so
    fusion leaves it alone, with KERNEL_ATTR KIND and CONFIG_ATTR cfg."""
    from tvm.script import tirx as T

    M, K, N = cfg.m, cfg.k, cfg.n
    kf, eps = T.float32(K), T.float32(cfg.eps)

    @T.prim_func(private=True, s_tir=True)
    def norm_matmul(x: T.Buffer((M, K), "float32"), gamma: T.Buffer((K,), "float32"),
                    beta: T.Buffer((K,), "float32"), w: T.Buffer((K, N), DTYPE), bias: T.Buffer((N,), "float32"),
                    out: T.Buffer((M, N), cfg.out_dtype)):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8, KERNEL_ATTR: KIND})
        total = T.sblock_alloc_buffer((M,), "float32")
        var_sum = T.sblock_alloc_buffer((M,), "float32")
        y = T.sblock_alloc_buffer((M, K), DTYPE)
        acc = T.sblock_alloc_buffer((M, N), "float32")
        for i, k in T.grid(M, K):
            with T.sblock("sum"):
                vi, vk = T.axis.remap("SR", [i, k])
                with T.init():
                    total[vi] = T.float32(0)
                total[vi] = total[vi] + x[vi, vk]
        for i, k in T.grid(M, K):
            with T.sblock("var_sum"):
                vi, vk = T.axis.remap("SR", [i, k])
                with T.init():
                    var_sum[vi] = T.float32(0)
                var_sum[vi] = var_sum[vi] + (x[vi, vk] - total[vi] / kf) * (x[vi, vk] - total[vi] / kf)
        for i, k in T.grid(M, K):
            with T.sblock("norm"):
                vi, vk = T.axis.remap("SS", [i, k])
                y[vi, vk] = T.Cast(DTYPE, (x[vi, vk] - total[vi] / kf) * T.rsqrt(var_sum[vi] / kf + eps)
                                   * gamma[vk] + beta[vk])
        for i, j, k in T.grid(M, N, K):
            with T.sblock("matmul"):
                vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                with T.init():
                    acc[vi, vj] = T.float32(0)
                acc[vi, vj] = acc[vi, vj] + T.Cast("float32", y[vi, vk]) * T.Cast("float32", w[vk, vj])
        for i, j in T.grid(M, N):
            with T.sblock("out"):
                vi, vj = T.axis.remap("SS", [i, j])
                out[vi, vj] = T.Cast(cfg.out_dtype, acc[vi, vj] + bias[vj])

    from ..ptx.verify import PRECISION_ATTR

    # an fp16 operand may round the other way in a kernel's own row sums (schedules/norm_matmul_cuda.py's bound)
    return norm_matmul.with_attr(CONFIG_ATTR, vars(cfg)).with_attr(PRECISION_ATTR, DTYPE)


def config_of(func) -> NormMatmulConfig:
    from .w2a8 import attr_value

    return NormMatmulConfig(**attr_value(func.attrs[CONFIG_ATTR]))
