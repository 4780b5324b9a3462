"""A source file's kind, told by its name alone, and its first bytes checked against that kind: before
torch and TVM are imported (seconds), so that a mistyped path or a wrong file is reported at once."""

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


def check_source(path: Path, heads: int | None = None) -> Path:
    """`path` if it exists and starts as a file of its kind does (loading it checks the rest), and
    --heads (`heads`) applies to it; else the error."""
    path = check_exists(path)
    if path.suffix == ".onnx" and heads is not None:
        raise BmvccError("--heads does not apply to an ONNX model (its attention is fixed in the graph); drop it")
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError as e:
        raise BmvccError(f"cannot read '{path}' ({e.strerror or e}); check its permissions") from None
    if path.suffix == ".pt2" and not head.startswith(b"PK"):  # torch.export.save writes a zip archive
        raise BmvccError(f"'{path}' is not a readable torch.export program (not a zip archive); "
                         "save it with torch.export.save")
    if path.suffix == ".onnx" and not head.startswith(b"\x08"):  # field 1, ir_version (required), comes first
        raise BmvccError(f"'{path}' is not an ONNX model, or it is truncated or corrupt (it does not start with "
                         "an ONNX model's ir_version); export it again (bmvcc export-onnx)")
    if path.suffix not in KINDS and not head.startswith((b"PK", b"\x80")):  # torch.save: a zip, or pickle protocol 2
        raise BmvccError(f"'{path}' is not a PyTorch checkpoint (neither a zip archive nor a pickle); pass a .pth "
                         "state dict saved with torch.save(model.state_dict(), path)")
    return path
