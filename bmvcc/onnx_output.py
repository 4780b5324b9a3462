"""The ONNX file `bmvcc export-onnx` writes: its opsets, the mark that lets a later export replace it,
and the checks of an export request that come before torch is imported (seconds)."""

from __future__ import annotations

from pathlib import Path

from .artifact import check_output_file
from .errors import BmvccError
from .sources import KINDS, check_source

MIN_OPSET = 17  # LayerNormalization is a standard op from 17 on
DEFAULT_OPSET = 20  # the first with a Gelu op: below it GELU is erf arithmetic, which bmvcc's epilogue fusion skips
PRODUCER_KEY = "bmvcc_version"  # metadata_props entry of every export


def check_request(source_path: Path, output: Path, opset: int, heads: int | None = None, force: bool = False) -> None:
    """Refuses a source that is not a state dict, an output that is not a new or bmvcc-exported .onnx file
    in a writable folder (unless `force`), and an opset below MIN_OPSET."""
    if Path(source_path).suffix in KINDS:  # frontend.load_source reads these as programs and ONNX models
        raise BmvccError(f"'{source_path}' is not a BitMedViT state dict; export-onnx needs the .pth checkpoint")
    check_source(source_path, heads)
    output = Path(output)
    if output.suffix != ".onnx":
        raise BmvccError(f"output '{output}' must end in .onnx (bmvcc compile recognizes ONNX models by it)")
    check_output_file(output)
    if output.exists() and not force and not exported_by_bmvcc(output):
        raise BmvccError(f"output '{output}' exists and was not exported by bmvcc; choose another -o, "
                         "or pass --force to replace it")
    check_opset(opset)


def check_opset(opset: int) -> None:
    if opset < MIN_OPSET:
        raise BmvccError(f"--opset {opset} is too old: LayerNormalization needs opset {MIN_OPSET}; pass --opset {MIN_OPSET} or newer")


def exported_by_bmvcc(path: Path) -> bool:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001  not an ONNX model: onnx raises protobuf's DecodeError and others
        return False
    return any(prop.key == PRODUCER_KEY for prop in model.metadata_props)
