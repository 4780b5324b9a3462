"""Sources -> Relax: a BitMedViT state dict (rebuilt in PyTorch) or a torch.export program (.pt2)."""

from __future__ import annotations

import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint
from .errors import BmvccError
from .model import ViTConfig


@dataclass
class Source:
    """What the driver compiles: an eval-mode PyTorch module and the facts the artifact records."""

    module: torch.nn.Module
    input_shape: tuple[int, ...]  # per-image shape (C, H, W); the batch is chosen at compile time
    num_classes: int
    path: Path
    config: ViTConfig | None = None  # None for a .pt2 program
    info: dict = field(default_factory=dict)


def load_source(path: Path, heads: int | None = None, image_size: int | None = None,
                trust_pickle: bool = False) -> Source:
    path = Path(path)
    if path.suffix == ".pt2":
        return _load_program(path)
    state = checkpoint.load_state_dict(path, trust_pickle=trust_pickle)
    cfg = checkpoint.infer_config(state, heads=heads, image_size=image_size)
    model = checkpoint.build_model(state, cfg)
    return Source(model, (cfg.channels, cfg.image_size, cfg.image_size), cfg.num_classes, path, cfg)


def _load_program(path: Path) -> Source:
    if not path.is_file():
        raise BmvccError(f"program '{path}' does not exist; check the path")
    try:
        ep = torch.export.load(path)
    except (RuntimeError, zipfile.BadZipFile, KeyError, ValueError, EOFError, OSError) as e:
        raise BmvccError(f"'{path}' is not a readable torch.export program ({str(e)[:120]}); save it with torch.export.save") from None
    args = ep.example_inputs[0] if ep.example_inputs else ()
    if len(args) != 1 or not isinstance(args[0], torch.Tensor) or args[0].dim() != 4:
        raise BmvccError(f"'{path}' must take one NCHW image tensor; export it with a single (B, C, H, W) input")
    module = ep.module()
    with torch.no_grad():
        out = module(args[0])
    out = out[0] if isinstance(out, (tuple, list)) else out
    return Source(module, tuple(args[0].shape[1:]), int(out.shape[-1]), path)


def export(source: Source, batch: int) -> torch.export.ExportedProgram:
    example = torch.zeros((batch, *source.input_shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.export.export(source.module, (example,))


def to_relax(source: Source, batch: int):
    """Relax IRModule with `main(img[batch, C, H, W]) -> logits`, every weight a constant."""
    from tvm.relax.frontend.torch import from_exported_program

    if batch < 1:
        raise BmvccError(f"--batch {batch} must be at least 1")
    return from_exported_program(export(source, batch), keep_params_as_input=False)
