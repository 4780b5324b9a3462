"""The artifact directory: what `bmvcc compile` writes and `bmvcc.runtime` reads.

    OUTDIR/
      model.so        the compiled Relax VM executable (TVM runtime module; host code + kernels)
      weights.bin     the weights, a TVM param dict (tvm.runtime.load_param_dict): w0, w1, ... in
                      the order main takes them after the image
      metadata.json   config, input shape and dtype, classes, versions, target, source sha256, ...
    and for CUDA targets (bmvcc/gpu_build.py; listed in metadata.json's "device_files"):
      device.cubin    the cubin embedded in model.so
      device.json     arch, bmvcc kernels, ptxas resources, each launched PrimFunc's kernel launches
      device.ptx      the PTX that ptxas compiled into device.cubin (bmvcc verify emulates it)
      device_definitions.json  the launched PrimFuncs' compute definitions (unscheduled TIR, tvm.ir.save_json)

Written atomically: everything goes to a temporary sibling directory that is renamed into place
only when complete, so a failure leaves no OUTDIR and an existing OUTDIR stays untouched until the
new one is whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import BmvccError

MODULE = "model.so"
WEIGHTS = "weights.bin"
METADATA = "metadata.json"
DEVICE_BINARY = "device.cubin"
DEVICE_INFO = "device.json"
DEVICE_PTX = "device.ptx"
DEVICE_DEFINITIONS = "device_definitions.json"
DEVICE_FILES = (DEVICE_BINARY, DEVICE_INFO, DEVICE_PTX, DEVICE_DEFINITIONS)
FORMAT_VERSION = 1


def check_outdir(outdir: Path) -> Path:
    """The absolute OUTDIR if an artifact can be written there (checked before compiling, and again)."""
    outdir = Path(outdir).absolute()
    if outdir.exists() and not outdir.is_dir():
        raise BmvccError(f"output '{outdir}' exists and is not a directory; choose another -o")
    if not outdir.parent.is_dir():
        raise BmvccError(f"output parent directory '{outdir.parent}' does not exist; create it first")
    return outdir


@contextlib.contextmanager
def staging(outdir: Path):
    """Yields a temporary directory; on success it replaces `outdir`, on any error it is removed."""
    outdir = check_outdir(outdir)
    parent = outdir.parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.", dir=parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp made it 0700; OUTDIR is an ordinary directory
        old = None
        if outdir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.old.", dir=parent))
            os.rename(outdir, old / "x")
        os.rename(tmp, outdir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set and restore
    os.umask(mask)
    return mask


def write_metadata(directory: Path, metadata: dict) -> None:
    (Path(directory) / METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")


def read_metadata(outdir: Path) -> dict:
    path = Path(outdir) / METADATA
    if not path.is_file():
        raise BmvccError(f"'{outdir}' is not a bmvcc artifact (no {METADATA}); pass the directory bmvcc compile wrote")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise BmvccError(f"'{path}' is corrupt; compile the model again") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise BmvccError(f"'{outdir}' has artifact format {meta.get('format_version')}, this bmvcc reads {FORMAT_VERSION}; compile again")
    return meta
