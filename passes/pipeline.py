"""bmvcc's Relax pipeline: an explicit, ordered list of small named passes.

Each entry is (name, tvm.transform.Pass): TVM's own passes, and bmvcc's (each IRModule -> IRModule,
documented in its own file) wrapped as module passes by `module_pass`.
A pass with something to report leaves it as JSON in the module attr REPORT_PREFIX + its name
here; run_pipeline collects and removes it.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .bf16_matmuls import bf16_matmuls
from .drop_training_outputs import drop_training_outputs
from .externalize_weights import content_key, externalize_weights
from .fp16_matmuls import fp16_matmuls
from .fuse_causal_attention import fuse_attention_cuda, fuse_causal_attention
from .fuse_norm_matmul import fuse_norm_matmul
from .fuse_norm_quant import fuse_norm_quant
from .fuse_w2a8_epilogue import fuse_w2a8_epilogue
from .pad_w2a8_to_tiles import pad_w2a8_to_tiles
from .quantize_bitlinear import quantize_bitlinear
from .scalar_fills import scalar_fills
from .transpose_matmul_weights import transpose_matmul_weights
from .relax_match import REPORT_PREFIX, read_report


def module_pass(func, **options) -> tvm.transform.Pass:
    """A bmvcc pass function (IRModule -> IRModule, given `options`) as a tvm.transform module pass of the same name."""
    return tvm.transform.module_pass(lambda mod, _ctx: func(mod, **options), opt_level=0, name=func.__name__)


def passes(bitlinear: bool = True, device: str | None = None,
           float_precision: str = "float32") -> list[tuple[str, tvm.transform.Pass]]:
    """The ordered passes; `device` ("cpu" / "cuda", the target's): passes that exist for one kind only;
    `float_precision` "bf16" (CPU): the Linear layers' matmuls and causal attention's products on bf16 operands."""
    bf16 = float_precision == "bf16"
    bitlinear_passes = [
        # Phase 2: BitLinear -> int8 x 2-bit kernels (weights ternarized and packed at compile time)
        ("quantize_bitlinear", module_pass(quantize_bitlinear)),
        ("fuse_norm_quant", module_pass(fuse_norm_quant)),  # RMSNorm + int8 quantization in one kernel
        ("fuse_w2a8_epilogue", module_pass(fuse_w2a8_epilogue)),  # GELU / residual add into the W2A8 kernel
    ]
    return [
        # Phase 1: tidy the imported graph
        ("drop_training_outputs", module_pass(drop_training_outputs)),
        ("canonicalize_bindings", relax.transform.CanonicalizeBindings()),
        ("drop_dead_outputs", relax.transform.DeadCodeElimination(["main"])),
        *(bitlinear_passes if bitlinear else []),
        # GPU only: float matmuls on fp16 operands (before fold_constants, which casts their weights)
        *([("fp16_matmuls", module_pass(fp16_matmuls))] if device == "cuda" else []),
        # CPU --float-precision bf16: the Linear layers' matmuls on bf16 operands (also before fold_constants)
        *([("bf16_matmuls", module_pass(bf16_matmuls))] if bf16 else []),
        # Phase 3: fold what is known at compile time (weight quantization of float paths)
        ("drop_dead_weights", relax.transform.DeadCodeElimination(["main"])),
        ("fold_constants", relax.transform.FoldConstant()),
        ("scalar_fills", module_pass(scalar_fills)),  # a where's branch of one repeated value -> that scalar
        # Phase 4: attention -> one kernel (CPU: causal, skipping the masked half; CUDA: causal or unmasked)
        *([("fuse_causal_attention", module_pass(fuse_causal_attention, bf16=bf16))] if device == "cpu" else []),
        *([("fuse_causal_attention", module_pass(fuse_attention_cuda))] if device == "cuda" else []),
        # GPU only: a LayerNorm read only by a float matmul + bias (a float QKV projection's, fc1's) -> one kernel
        *([("fuse_norm_matmul", module_pass(fuse_norm_matmul))] if device == "cuda" else []),
        ("dead_code_elimination", relax.transform.DeadCodeElimination(["main"])),
        # GPU only: W2A8 calls on the tensor-core kernel's tiles (operands padded, output sliced), their constant
        # weights then padded and relaid out at compile time, the replaced W2A8 PrimFuncs dropped
        *([("pad_w2a8_to_tiles", module_pass(pad_w2a8_to_tiles)),
           ("fold_tiled_weights", relax.transform.FoldConstant()),
           ("drop_untiled_kernels", relax.transform.DeadCodeElimination(["main"]))] if device == "cuda" else []),
        # GPU only: constant fp16 matmul weights stored [N, K], so DLight's B tile loads them contiguously (by
        # cp.async); after the last FoldConstant, which would fold their permute_dims back
        *([("transpose_matmul_weights", module_pass(transpose_matmul_weights))] if device == "cuda" else []),
    ]


def run_pipeline(mod, spec, bitlinear: bool = True, dump=lambda name, mod: None, float_precision: str = "float32"):
    """Returns (module, weights, report): weights are main's parameters after the image.

    externalize_weights always runs last. The report states the BitLinear layers rewritten and
    not (with reasons) and the weight bytes by kind. `dump(name, mod)` (bmvcc/irdump.py) sees the
    module before the passes and after each.
    """
    reports: dict = {}
    dump("import", mod)
    for name, p in passes(bitlinear, spec.device if spec is not None else None, float_precision):
        mod = p(mod)
        key = REPORT_PREFIX + name
        if mod.attrs is not None and key in mod.attrs:
            reports[name] = read_report(mod, key)
            mod = mod.without_attr(key)
        dump(name, mod)
    report = _bitlinear_report(reports, bitlinear)
    attention = reports.get("fuse_causal_attention", {"fused": 0})
    report["causal_attention_fused"] = attention["fused"]
    report["norm_matmul_fused"] = reports.get("fuse_norm_matmul", {"fused": 0})["fused"]
    report["weight_bytes"] = _weight_bytes(mod)
    report["bf16_narrowed"] = reports.get("bf16_matmuls", {"narrowed": 0})["narrowed"]  # --float-precision bf16
    report["bf16_attention"] = attention.get("bf16", 0)  # CPU --float-precision bf16 (CUDA's pass reports none)
    mod, weights = externalize_weights(mod)
    dump("externalize_weights", mod)
    return mod, weights, report


def _bitlinear_report(reports: dict, enabled: bool) -> dict:
    if not enabled:
        return {"bitlinear": {"enabled": False, "rewritten": 0, "layers": [], "not_rewritten": []}}
    quantized = reports["quantize_bitlinear"]
    return {"bitlinear": {
        "enabled": True,
        "rewritten": len(quantized["rewritten"]),
        "layers": [r["name"] for r in quantized["rewritten"]],
        "not_rewritten": quantized["not_rewritten"],
        "norm_quant_fused": reports["fuse_norm_quant"]["fused"],
        "epilogues": reports["fuse_w2a8_epilogue"],
    }}


def _weight_bytes(mod) -> dict:
    """Bytes of main's distinct constants (each counted once, as weights.bin stores it) by kind: 2-bit packed
    (uint8), float tensors, one-element scalars (the per-tensor ternary scales among them), other."""
    sizes = {"packed_2bit": 0, "float": 0, "scalar": 0, "other": 0}
    seen: set = set()

    @relax.expr_functor.visitor
    class _Sizes(relax.PyExprVisitor):
        def visit_generic_const_(self, const):
            value = const.value
            if not hasattr(value, "shape") or (key := content_key(value.numpy())) in seen:
                return
            seen.add(key)
            nbytes = int(np.prod([int(d) for d in value.shape])) * np.dtype(str(value.dtype)).itemsize
            dtype = str(value.dtype)
            kind = ("packed_2bit" if dtype == "uint8" else "other" if "float" not in dtype
                    else "scalar" if nbytes == np.dtype(dtype).itemsize else "float")
            sizes[kind] += nbytes

    _Sizes().visit_expr(mod["main"])
    return sizes


def describe(report: dict) -> str:
    """The report in a few lines for the compile summary."""
    bl, wb = report["bitlinear"], report["weight_bytes"]
    if not bl["enabled"]:
        lines = ["BitLinear: off (--no-bitlinear): every layer runs as float matmuls"]
    else:
        lines = [f"BitLinear: {bl['rewritten']} layers -> int8 x 2-bit W2A8 kernels "
                 f"({bl['norm_quant_fused']} with fused norm+quantization, epilogues: "
                 f"{bl['epilogues']['gelu']} GELU, {bl['epilogues']['gelu_tanh']} tanh GELU, "
                 f"{bl['epilogues']['residual']} residual, {bl['epilogues']['bias']} bias)"]
        lines += [f"warning: {r['name']} looks like a BitLinear but is not rewritten (it runs in float): {r['reason']}"
                  for r in bl["not_rewritten"]]
    if report["causal_attention_fused"]:
        lines.append(f"attention: {report['causal_attention_fused']} layers -> one kernel each")
    if report["norm_matmul_fused"]:
        lines.append(f"layer norm: {report['norm_matmul_fused']} float projections take their LayerNorm in one kernel")
    lines.append(f"weights: {wb['packed_2bit']:,} B 2-bit packed, {wb['float']:,} B float, "
                 f"{wb['scalar']:,} B scalars")
    return "\n".join(lines)
