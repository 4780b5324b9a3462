"""Memory a compile needs, estimated from shapes before anything is allocated, against this machine's.

need = COMPILER_FACTOR x float32 weights + batch x (image + activations of one image). The factor
counts the weight copies alive at once while compiling (state dict, PyTorch model, Relax constants,
packed and written weights); activations are what the compiled module allocates per image when it
runs (known for a BitMedViT, taken as the image alone for other models). A run that exceeds the
machine's memory would end in an allocation failure minutes into a compile, or in a killed process.
"""

from __future__ import annotations

import math

from .errors import BmvccError

COMPILER_FACTOR = 4
FLOAT32 = 4  # bytes; the compiler keeps every weight and activation in float32


def bitmedvit_activations(cfg) -> int:
    """Bytes one image needs while a BitMedViT runs: the image and its patches, four token x dim
    tensors (residual, q|k|v, context, projection), the FFN's hidden layer before and after GELU,
    every head's attention scores before and after softmax."""
    n = cfg.num_tokens
    elements = 2 * cfg.channels * cfg.image_size**2 + n * (4 * cfg.dim + 2 * cfg.mlp_dim) + 2 * cfg.heads * n * n
    return FLOAT32 * elements


def check_compile(weight_elements: int, input_shape: tuple[int, ...], batch: int, activation_bytes: int = 0,
                  action: str = "compiling") -> None:
    """Refuses a compile (or an ONNX export: `action`) of a model with `weight_elements` weights and
    images of `input_shape` at `batch` that this machine's memory cannot hold."""
    per_image = FLOAT32 * math.prod(input_shape) + activation_bytes
    fixed = COMPILER_FACTOR * FLOAT32 * weight_elements
    need, have = fixed + batch * per_image, machine_memory()
    if need <= have:
        return
    if fixed + per_image > have:
        raise BmvccError(f"{action} this model needs about {human(fixed + per_image)} of memory even at batch 1, "
                         f"this machine has {human(have)}; it is too large for this machine ({weight_elements:,} "
                         "weights): use one with more memory")
    raise BmvccError(f"{action} this model at batch {batch} needs about {human(need)} of memory, this machine has "
                     f"{human(have)}; use a smaller --batch (at most {(have - fixed) // per_image} fits)")


def machine_memory() -> int:
    import psutil

    return psutil.virtual_memory().total


def human(nbytes: int) -> str:
    """3.2 TB, 24 GB, 512 MB: decimal units, two significant figures below 10."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= size:
            value = nbytes / size
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{nbytes} bytes"


def npy_claim(f) -> tuple[tuple[int, ...], "object", int]:
    """(shape, dtype, bytes of data) that the .npy header at file object `f`'s position claims; `f` is left
    after the header. Read before loading, so a header claiming terabytes allocates nothing."""
    from numpy.lib import format as npy

    version = npy.read_magic(f)
    read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
    shape, _fortran, dtype = read_header(f)
    return shape, dtype, math.prod(shape) * dtype.itemsize

