"""--float-precision: the precision of the float matmuls, whether a target takes it, and the error of a
build in it against the float32 model."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .errors import BmvccError

FLOAT_PRECISIONS = ("float32", "bf16")  # float32 (the default): float parts exactly as the model computes them
ERROR_IMAGES = 4  # seeded standard-normal images, the scale of preprocessed pixels
ERROR_SEED = 0


def check(precision: str, spec) -> None:
    """Refuses a precision bmvcc does not know, and bf16 on a target whose CPU lacks vdpbf16ps (for the host: or
    hides it, a virtual machine's CPU model not reporting it; the host target turns it off then, targets/cpu.py)."""
    if precision not in FLOAT_PRECISIONS:
        raise BmvccError(f"unknown --float-precision '{precision}'; choose one of: {', '.join(FLOAT_PRECISIONS)}")
    if precision == "float32":
        return
    if spec.device != "cpu":
        raise BmvccError(f"--float-precision {precision} is for CPU targets, and '{spec.name}' is a GPU (its float "
                         "matmuls run on fp16 tensor cores already); drop --float-precision")
    from .targets.cpu import BF16_DOT_FEATURE, has_bf16_dot
    from .targets.isa import FEATURES

    target = spec.target()
    needs = f"--float-precision bf16 needs a CPU with AVX-512 BF16 ({BF16_DOT_FEATURE}: vdpbf16ps)"
    instead = "compile with the default --float-precision float32"
    cpu = target.attrs.get("mcpu", "its CPU")
    if f"-{BF16_DOT_FEATURE}" in [str(f) for f in target.attrs.get("mattr", [])]:  # the host's, turned off
        raise BmvccError(f"{needs}; this machine's CPU is a {cpu} but does not report "
                         f"{FEATURES['x86_64'][BF16_DOT_FEATURE]} (a virtual machine may hide it); {instead}")
    if not has_bf16_dot(target):
        raise BmvccError(f"{needs}, which target '{spec.name}' ({cpu}) lacks; {instead}")


def error_vs_float32(outdir: Path, source, progress: Callable[[str], None]) -> dict | None:
    """The compiled model in `outdir` against `source`'s PyTorch model (float32) on ERROR_IMAGES seeded
    images: the largest absolute logit difference and on how many images the argmax agrees. None for an
    ONNX source (no PyTorch model to run), or, said through `progress`, where the measurement fails: the
    artifact is finished and stands without it."""
    if source.module is None:
        return None
    import numpy as np

    from .frontend import torch_logits
    from .runtime import load

    images = np.random.default_rng(ERROR_SEED).standard_normal((ERROR_IMAGES, *source.input_shape)).astype("float32")
    try:
        reference = torch_logits(source)(images)
        logits = load(outdir)(images)
    except Exception as e:  # noqa: BLE001  (whatever the source's own code raises: the build is done)
        progress(f"error against float32 not measured: {type(e).__name__}: {' '.join(str(e).split())[:200]}")
        return None
    return {"images": ERROR_IMAGES, "max_abs_logit_error": float(np.abs(logits - reference).max()),
            "argmax_agrees": int((logits.argmax(1) == reference.argmax(1)).sum())}


def narrowed(passes: dict) -> int:
    """Layers whose products take narrowed operands, by the pass report (bf16_narrowed Linear matmuls,
    bf16_attention causal attention kernels); 0: the build is float32."""
    return passes["bf16_narrowed"] + passes["bf16_attention"]


def describe(precision: str, passes: dict, error: dict | None) -> str:
    """The summary line of a build in `precision` (not float32) with the pass report `passes`."""
    if not narrowed(passes):
        return (f"float precision: {precision} requested, but no matmul fits vdpbf16ps (a constant K x N weight, "
                "K even, N a multiple of 16) and no causal attention was fused: the build is float32")
    what = (f"float precision: {precision} ({passes['bf16_narrowed']} Linear layers' matmuls and "
            f"{passes['bf16_attention']} attention layers' Q.K^T and P.V on {precision} operands, "
            "float32 accumulation)")
    if error is None:
        return what + "; error against float32 not measured (it needs a PyTorch source)"
    n = error["images"]
    return (what + f"; against the float32 PyTorch model on {n} seeded random images: max |logit error| "
            f"{error['max_abs_logit_error']:.2e}, argmax agrees on {error['argmax_agrees']} of {n}")
