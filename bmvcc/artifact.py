"""The artifact directory: what `bmvcc compile` writes and `bmvcc.runtime` reads.

    OUTDIR/
      model.so        the compiled Relax VM executable (TVM runtime module; host code + kernels)
      weights.bin     the weights, a TVM param dict (tvm.runtime.load_param_dict): w0, w1, ... in
                      the order main takes them after the image
      metadata.json   config, input shape and dtype, classes, versions, target, source sha256, ...

Written atomically: everything goes to a temporary sibling directory that is renamed into place
only when complete, so a failure leaves no OUTDIR and an existing OUTDIR stays untouched until the
new one is whole. An existing OUTDIR is replaced only when it is empty or a bmvcc artifact.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

from . import scratch
from .errors import BmvccError

MODULE = "model.so"
WEIGHTS = "weights.bin"
METADATA = "metadata.json"
FORMAT_VERSION = 1


def check_outdir(outdir: Path, force: bool = False, source: Path | None = None) -> Path:
    """The absolute OUTDIR if an artifact may be written there (checked before compiling, and again).

    An existing OUTDIR is replaced only when it is empty or holds nothing but a bmvcc artifact's
    files, or with `force`; it may never be or contain `source`, not even with `force`.
    """
    outdir = Path(os.path.abspath(outdir))  # abspath, not absolute(): "-o .." must name a folder, not ".."
    if source is not None and _contains(outdir, Path(source)):
        raise BmvccError(f"output '{outdir}' contains the source '{source}', which writing the artifact would delete; "
                         "choose another -o")
    if outdir.exists() and not outdir.is_dir():
        raise BmvccError(f"output '{outdir}' exists and is not a directory; choose another -o")
    if outdir.is_dir() and not force:
        foreign = _foreign_files(outdir)
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise BmvccError(f"output '{outdir}' holds files that are not a bmvcc artifact ({shown}); "
                             "choose another -o, or pass --force to replace the directory")
    _check_parent(outdir)
    return outdir


def check_output_file(path: Path) -> Path:
    """The absolute `path` if a file can be written there (before the work that produces it)."""
    path = Path(os.path.abspath(path))
    if path.is_dir():
        raise BmvccError(f"output '{path}' is a directory; name a file with -o")
    _check_parent(path)
    return path


def _check_parent(path: Path) -> None:
    if not path.parent.is_dir():
        raise BmvccError(f"output parent directory '{path.parent}' does not exist; create it first")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise BmvccError(f"cannot write in '{path.parent}' (permission denied or read-only); choose another -o")


def _contains(folder: Path, path: Path) -> bool:
    folder, path = folder.resolve(), path.resolve()
    return path == folder or folder in path.parents


def _foreign_files(outdir: Path) -> list[str]:
    """The names in `outdir` that bmvcc did not write: all of them unless its metadata.json is bmvcc's."""
    from .gpu_build import DEVICE_BINARY, DEVICE_INFO

    try:
        names = sorted(p.name for p in outdir.iterdir())
    except OSError as e:
        raise BmvccError(f"cannot read output '{outdir}' ({e.strerror}); choose another -o") from None
    try:
        meta = json.loads((outdir / METADATA).read_text())
    except (OSError, ValueError):
        meta = None
    ours = isinstance(meta, dict) and "bmvcc_version" in meta
    own = {MODULE, WEIGHTS, METADATA, DEVICE_BINARY, DEVICE_INFO} if ours else set()
    return [name for name in names if name not in own]


@contextlib.contextmanager
def staging(outdir: Path, force: bool = False, source: Path | None = None):
    """Yields a new directory beside `outdir`; on success it replaces `outdir` (see check_outdir),
    on any error or interruption it is removed. Write errors become a BmvccError."""
    outdir = check_outdir(outdir, force, source)
    parent = outdir.parent
    scratch.remove_dead(parent)  # what killed runs left
    try:
        tmp = scratch.make(parent, prefix=f".{outdir.name}.")
    except OSError as e:
        raise write_error(e, outdir) from None
    try:
        yield tmp
        check_outdir(outdir, force, source)  # OUTDIR may have changed during the build
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp made it 0700; OUTDIR is an ordinary directory
        _replace(tmp, outdir)
    except OSError as e:
        raise write_error(e, outdir) from None
    except Exception as e:  # noqa: BLE001  TVM and the linker report a full disk in their own errors
        if os.strerror(errno.ENOSPC) in str(e):
            raise write_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), outdir) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace(tmp: Path, outdir: Path) -> None:
    """Renames `tmp` to `outdir`; an existing `outdir` is put back if that fails."""
    if not outdir.exists():
        os.rename(tmp, outdir)
        return
    old = scratch.make(outdir.parent, prefix=f".{outdir.name}.old.")
    try:
        os.rename(outdir, old / "x")
        try:
            os.rename(tmp, outdir)
        except BaseException:  # an error, or a signal between the two renames: the previous one goes back
            os.rename(old / "x", outdir)
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def write_error(e: OSError, path: Path) -> BmvccError:
    """The one-line error for an OSError while writing `path`."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return BmvccError(f"no space left on device while writing '{path}'; free some space or choose another -o")
    return BmvccError(f"cannot write '{path}' ({e.strerror or e}); choose another -o")


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
