"""A source file's kind, told by its name alone: checked before torch and TVM are imported (seconds),
so that a mistyped path is reported at once."""

from __future__ import annotations

from pathlib import Path

from .errors import BmvccError

KINDS = {".pt2": "program", ".onnx": "ONNX model"}  # any other name: a PyTorch state dict


def check_exists(path: Path) -> Path:
    """`path` if it is a file; else the error naming it by its kind ("checkpoint", "program", ...)."""
    path = Path(path)
    if not path.is_file():
        raise BmvccError(f"{KINDS.get(path.suffix, 'checkpoint')} '{path}' does not exist; check the path")
    return path
