"""bmvcc: compile ternary-weight BitMedViT vision transformers into Apache TVM modules."""

from __future__ import annotations

from .threads import default_tvm_threads

__version__ = "0.1.0"

default_tvm_threads()  # before TVM's thread pool exists (bmvcc.threads)


def load(outdir, device: str | None = None):
    """A callable numpy -> numpy over a compiled artifact, on the device it was compiled for by default."""
    from .runtime import load as _load

    return _load(outdir, device=device)
