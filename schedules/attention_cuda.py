"""Attention as one CUDA kernel per layer: O = softmax(scale * Q K^T [+ causal mask]) V, fp16 in and out.

Layout (TVM's sequence-prefill kernel's): q [B, N, H, D], k and v [B, N, Hkv, D], out [B, N, H, D] float16
and lse [B, N, H] float16; query head h reads K/V head h // (H / Hkv) (Hkv = 1: multi-query, one K/V tile
per CTA shared by every query head), and with `causal` query i attends to keys j <= i, the condition
computed from the indices (no mask tensor). With `width` set, q, k and v are instead one QKV projection output
[B, N, width] (passes/fuse_causal_attention.py hands the same tensor three times, no layout copies): q head h at
columns q_offset + h D .. + D, K/V head h at k_offset + h D and v_offset + h D; and out is written in
`out_dtype` (the dtype its consumer reads, float32 or float16; exact: out is an fp16 value either way).

`attention_compute` is the compute definition (unscheduled: bmvcc verify's reference, and what an llvm
build of the GPU pipeline runs as written). Scores t_j = scale * log2(e) * q.k_j (fp16 products
accumulated in float32), m = max_j t_j, w_j = 2^(t_j - m), out = (sum_j w_j v_j) / sum_j w_j rounded to
fp16, lse = m + log2(sum_j w_j) (base 2; no consumer reads it, the kernel writes it).
`schedule` replaces it with TVM 0.27's flash-style prefill kernel
(tvm.relax.frontend.nn.llm._prefill_kernels._attention_sequence_prefill, the one MLC-LLM runs): per CTA
of 4 warps, 32 query rows (of one batch entry, all heads of a K/V group) against 32-key tiles of K and V
in shared memory, online softmax (running max and sum in float32), both GEMMs on CUDA cores in float32;
the N x N scores never reach global memory. It visits every key tile (masked ones too). CUDA builds use
schedules/attention_cuda_tc.py's tensor-core kernel where it takes the shape; this one otherwise and as the
benchmark baseline (benchmarks/bench_orin_estimate.py --tvm-attention).

Error versus float32 attention of the unrounded inputs (u = 2^-11, fp16's unit roundoff): rounding q and k
moves each score by at most Delta_i = (2u + u^2) * scale * sum_d |q_id k_jd| (max over j), hence each
weight p_ij by a factor within e^(+-2 Delta_i); rounding v and the output adds u * max|v| each, so
|out - out32| <= (e^(2 Delta_i) - 1 + 2u) * max_j |v_j| per row and column (tests/test_attention_cuda.py),
the fp16 rounding the unfused GPU path (passes/fp16_matmuls.py) already applied to Q, K, V and P.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .w2a8 import CONFIG_ATTR, KERNEL_ATTR, with_kernel_attrs

KIND = "attention_prefill"
DTYPE = "float16"


@dataclass(frozen=True)
class PrefillConfig:
    batch: int  # B
    heads: int  # H: query heads
    kv_heads: int  # Hkv, dividing H
    tokens: int  # N (queries and keys)
    head_dim: int  # D
    scale: float  # applied to q.k before the softmax
    causal: bool
    width: int = 0  # elements per token of one [B, N, width] q/k/v tensor; 0: separate [B, N, heads, D] tensors
    q_offset: int = 0  # columns where q, k and v start in it
    k_offset: int = 0
    v_offset: int = 0
    out_dtype: str = DTYPE

    def supported(self) -> bool:
        """TVM's prefill kernel takes these shapes (its tiles divide its 128 threads)."""
        from tvm.target import Target

        try:
            _prefill_config(self, Target({"kind": "cuda", "arch": "sm_87"}))
        except ValueError:
            return False
        return self.heads % self.kv_heads == 0 and not self.width and self.out_dtype == DTYPE


def operand_shapes(cfg: PrefillConfig) -> tuple:
    """Buffer shapes of q and of k, v."""
    if cfg.width:
        return (cfg.batch, cfg.tokens, cfg.width), (cfg.batch, cfg.tokens, cfg.width)
    return (cfg.batch, cfg.tokens, cfg.heads, cfg.head_dim), (cfg.batch, cfg.tokens, cfg.kv_heads, cfg.head_dim)


def element(cfg: PrefillConfig, buf, offset, b, i, h, d):
    """buf's element (b, token i, head h, d) of q (offset q_offset), k or v: a load, for TVMScript."""
    return buf[b, i, offset + h * cfg.head_dim + d] if cfg.width else buf[b, i, h, d]


def output_value(cfg: PrefillConfig, x):
    """x (float32) rounded to fp16, as out_dtype."""
    from tvm.script import tirx as T

    return T.Cast(DTYPE, x) if cfg.out_dtype == DTYPE else T.Cast(cfg.out_dtype, T.Cast(DTYPE, x))


def _prefill_config(cfg: PrefillConfig, target):
    from tvm.relax.frontend.nn.llm._kernel_common import _get_prefill_kernel_config

    return _get_prefill_kernel_config(cfg.kv_heads, cfg.heads, cfg.head_dim, DTYPE, target)


def attention_compute(cfg: PrefillConfig):
    """Unscheduled PrimFunc (q, k, v, out, lse) as in the module docstring; opaque (op_pattern 8), so fusion
    leaves it alone, with KERNEL_ATTR KIND and CONFIG_ATTR cfg."""
    from tvm.script import tirx as T

    B, H, HKV, N, D = cfg.batch, cfg.heads, cfg.kv_heads, cfg.tokens, cfg.head_dim
    G = H // HKV
    QS, KVS = operand_shapes(cfg)
    QO, KO, VO = cfg.q_offset, cfg.k_offset, cfg.v_offset
    coef = T.float32(cfg.scale * math.log2(math.e))

    def visible(i, j):
        return j <= i if cfg.causal else T.bool(True)

    @T.prim_func(private=True, s_tir=True)
    def attention(q: T.Buffer(QS, DTYPE), k: T.Buffer(KVS, DTYPE), v: T.Buffer(KVS, DTYPE),
                  out: T.Buffer((B, N, H, D), cfg.out_dtype), lse: T.Buffer((B, N, H), DTYPE)):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8, KERNEL_ATTR: KIND})
        s = T.sblock_alloc_buffer((B, N, H, N), "float32")
        m = T.sblock_alloc_buffer((B, N, H), "float32")
        w = T.sblock_alloc_buffer((B, N, H, N), "float32")
        total = T.sblock_alloc_buffer((B, N, H), "float32")
        acc = T.sblock_alloc_buffer((B, N, H, D), "float32")
        for b, i, h, j, d in T.grid(B, N, H, N, D):
            with T.sblock("scores"):
                vb, vi, vh, vj, vd = T.axis.remap("SSSSR", [b, i, h, j, d])
                with T.init():
                    s[vb, vi, vh, vj] = T.float32(0)
                s[vb, vi, vh, vj] = s[vb, vi, vh, vj] + (
                    T.Cast("float32", element(cfg, q, QO, vb, vi, vh, vd))
                    * T.Cast("float32", element(cfg, k, KO, vb, vj, vh // G, vd)) * coef)
        for b, i, h, j in T.grid(B, N, H, N):
            with T.sblock("max"):
                vb, vi, vh, vj = T.axis.remap("SSSR", [b, i, h, j])
                with T.init():
                    m[vb, vi, vh] = T.float32(-3.0e38)
                m[vb, vi, vh] = T.Select(visible(vi, vj), T.max(m[vb, vi, vh], s[vb, vi, vh, vj]), m[vb, vi, vh])
        for b, i, h, j in T.grid(B, N, H, N):
            with T.sblock("weights"):
                vb, vi, vh, vj = T.axis.remap("SSSS", [b, i, h, j])
                w[vb, vi, vh, vj] = T.Select(visible(vi, vj), T.exp2(s[vb, vi, vh, vj] - m[vb, vi, vh]), T.float32(0))
        for b, i, h, j in T.grid(B, N, H, N):
            with T.sblock("sum"):
                vb, vi, vh, vj = T.axis.remap("SSSR", [b, i, h, j])
                with T.init():
                    total[vb, vi, vh] = T.float32(0)
                total[vb, vi, vh] = total[vb, vi, vh] + w[vb, vi, vh, vj]
        for b, i, h, d, j in T.grid(B, N, H, D, N):
            with T.sblock("pv"):
                vb, vi, vh, vd, vj = T.axis.remap("SSSSR", [b, i, h, d, j])
                with T.init():
                    acc[vb, vi, vh, vd] = T.float32(0)
                acc[vb, vi, vh, vd] = acc[vb, vi, vh, vd] + w[vb, vi, vh, vj] * T.Cast(
                    "float32", element(cfg, v, VO, vb, vj, vh // G, vd))
        for b, i, h, d in T.grid(B, N, H, D):
            with T.sblock("out"):
                vb, vi, vh, vd = T.axis.remap("SSSS", [b, i, h, d])
                out[vb, vi, vh, vd] = output_value(cfg, acc[vb, vi, vh, vd] / total[vb, vi, vh])
        for b, i, h in T.grid(B, N, H):
            with T.sblock("lse"):
                vb, vi, vh = T.axis.remap("SSS", [b, i, h])
                lse[vb, vi, vh] = T.Cast(DTYPE, m[vb, vi, vh] + T.log2(total[vb, vi, vh]))

    from ..ptx.verify import PRECISION_ATTR

    return attention.with_attr(CONFIG_ATTR, vars(cfg)).with_attr(PRECISION_ATTR, DTYPE)


def config_of(func) -> PrefillConfig:
    from .w2a8 import attr_value

    return PrefillConfig(**attr_value(func.attrs[CONFIG_ATTR]))


def supported(cfg: PrefillConfig) -> bool:
    """Whether `schedule` takes cfg (schedules/kernels.py's scheduler_of asks the registered scheduler)."""
    return cfg.supported()


def kernel_ops(func) -> float:
    """Arithmetic of the prefill kernel for `func`'s configuration: Q K^T and P V over every key tile (it does not
    skip masked ones), a multiply-add counted as 2."""
    cfg = config_of(func)
    return 4.0 * cfg.batch * cfg.heads * cfg.tokens * cfg.tokens * cfg.head_dim


def schedule(func, target, knobs=None):
    """TVM's prefill kernel for `func`'s configuration, its shapes fixed to the definition's (bound by
    specialization), with `func`'s kernel attributes; tirx.is_scheduled. No knobs: TVM picks its tiles."""
    from tvm import tirx
    from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_sequence_prefill

    cfg = config_of(func)
    kernel = _attention_sequence_prefill(cfg.kv_heads, cfg.heads, cfg.head_dim, DTYPE, target, int(cfg.causal),
                                         cfg.scale)
    shapes = {str(p.name): p.ty.shape for p in func.params}
    names = ("q", "k", "v", "out", "lse")  # the definition's parameters, in the kernel's order
    kernel = kernel.specialize({p: tirx.decl_buffer(shapes[n], DTYPE) for p, n in zip(kernel.params, names)})
    return with_kernel_attrs(kernel, func)
