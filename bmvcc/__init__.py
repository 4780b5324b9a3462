"""bmvcc: compile ternary-weight BitMedViT vision transformers into Apache TVM modules."""

__version__ = "0.1.0"


def load(outdir, device: str = "cpu"):
    """A callable numpy -> numpy over a compiled artifact (see bmvcc.runtime)."""
    from .runtime import load as _load

    return _load(outdir, device=device)
