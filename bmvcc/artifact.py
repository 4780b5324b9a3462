"""The artifact directory: what `bmvcc compile` writes and `bmvcc.runtime` reads.

    OUTDIR/
      model.so        the compiled Relax VM executable (TVM runtime module; host code + kernels)
      weights.bin     the weights, a TVM param dict (tvm.runtime.load_param_dict): w0, w1, ... in
                      the order main takes them after the image
      metadata.json   config, input shape and dtype, classes, weight shapes and dtypes, versions,
                      target (with target.isa: the CPU features its code may use, targets/isa.py), source
                      sha256, ..., and the size and sha256 of every other file
    and for CUDA targets (bmvcc/gpu_build.py):
      device.cubin    the cubin embedded in model.so
      device.json     arch, bmvcc kernels, ptxas resources, each launched PrimFunc's kernel launches
      device.ptx      the PTX that ptxas compiled into device.cubin (bmvcc verify emulates it)
      device_definitions.json  the launched PrimFuncs' compute definitions (unscheduled TIR, tvm.ir.save_json)

Readers go through `read_metadata`, which checks metadata.json's schema and every recorded file's size
and sha256 before anything loads model.so (native code: a damaged library can crash the process).

Written atomically: everything goes to a temporary sibling directory that is renamed into place
only when complete, so a failure leaves no OUTDIR and an existing OUTDIR stays untouched until the
new one is whole. An existing OUTDIR is replaced only when it is empty or a bmvcc artifact.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

from . import scratch
from .errors import BmvccError

MODULE = "model.so"
WEIGHTS = "weights.bin"
METADATA = "metadata.json"
FORMAT_VERSION = 2  # 2: "files" (size and sha256 of each file) and "weights" (shape and dtype of each)
DEVICE_BINARY = "device.cubin"
DEVICE_INFO = "device.json"
DEVICE_PTX = "device.ptx"
DEVICE_DEFINITIONS = "device_definitions.json"
DEVICE_FILES = (DEVICE_BINARY, DEVICE_INFO, DEVICE_PTX, DEVICE_DEFINITIONS)
RECORDED_FILES = (MODULE, WEIGHTS, *DEVICE_FILES)  # metadata.json records those present
_ELF_MACHINES = {3: "i386", 40: "arm", 62: "x86_64", 183: "aarch64", 243: "riscv64"}  # e_machine -> uname -m


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


def check_output_file(path: Path, option: str = "-o") -> Path:
    """The absolute `path` if a file can be written there (before the work that produces it); errors name
    `option`, the command-line option that gave the path."""
    path = Path(os.path.abspath(path))
    if path.is_dir():
        raise BmvccError(f"output '{path}' is a directory; name a file with {option}")
    _check_parent(path, option)
    return path


def _check_parent(path: Path, option: str = "-o") -> None:
    if not path.parent.is_dir():
        raise BmvccError(f"output parent directory '{path.parent}' does not exist; create it first")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise BmvccError(f"cannot write in '{path.parent}' (permission denied or read-only); choose another {option}")


def _contains(folder: Path, path: Path) -> bool:
    folder, path = folder.resolve(), path.resolve()
    return path == folder or folder in path.parents


def _foreign_files(outdir: Path) -> list[str]:
    """The names in `outdir` that bmvcc did not write: all of them unless its metadata.json is bmvcc's."""
    try:
        names = sorted(p.name for p in outdir.iterdir())
    except OSError as e:
        raise BmvccError(f"cannot read output '{outdir}' ({e.strerror}); choose another -o") from None
    try:
        meta = json.loads((outdir / METADATA).read_text())
    except (OSError, ValueError):
        meta = None
    ours = isinstance(meta, dict) and "bmvcc_version" in meta
    own = {METADATA, *RECORDED_FILES} if ours else set()
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


def write_error(e: OSError, path: Path, option: str = "-o") -> BmvccError:
    """The one-line error for an OSError while writing `path` (given by `option`)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return BmvccError(f"no space left on device while writing '{path}'; free some space or choose another {option}")
    return BmvccError(f"cannot write '{path}' ({e.strerror or e}); choose another {option}")


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set and restore
    os.umask(mask)
    return mask


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_metadata(directory: Path, metadata: dict) -> None:
    """metadata.json, with the size and sha256 of each of RECORDED_FILES now in `directory`."""
    directory = Path(directory)
    files = {name: {"bytes": (directory / name).stat().st_size, "sha256": sha256(directory / name)}
             for name in RECORDED_FILES if (directory / name).is_file()}
    text = json.dumps({**metadata, "files": files}, indent=2, sort_keys=True)
    (directory / METADATA).write_text(text + "\n")


def read_metadata(outdir: Path) -> dict:
    """The artifact's metadata, after checking its schema and every recorded file's size and sha256."""
    outdir = Path(outdir)
    path = outdir / METADATA
    if not path.is_file():
        raise BmvccError(f"'{outdir}' is not a bmvcc artifact (no {METADATA}); pass the directory bmvcc compile wrote")
    try:
        meta = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        raise BmvccError(f"'{path}' is corrupt ({str(e)[:80]}); compile the model again") from None
    if not isinstance(meta, dict):
        raise BmvccError(f"'{path}' is corrupt (not a JSON object); compile the model again")
    if meta.get("format_version") != FORMAT_VERSION:
        raise BmvccError(f"'{outdir}' has artifact format {meta.get('format_version')}, this bmvcc reads {FORMAT_VERSION}; compile again")
    problem = _schema_problem(meta)
    if problem:
        raise BmvccError(f"'{path}' is damaged ({problem}); compile the model again")
    for name, record in meta["files"].items():
        _verify(outdir / name, record, meta["target"])
    return meta


def _verify(path: Path, record: dict, target: dict) -> None:
    """`path` is the file compile wrote: same size, same sha256 (else it is damaged or was replaced)."""
    if not path.is_file():
        raise BmvccError(f"'{path}' is missing; compile the model again")
    size = path.stat().st_size
    if size == record["bytes"] and sha256(path) == record["sha256"]:
        return
    arch = _elf_arch(path) if path.name == MODULE else None
    if arch is not None and arch != target["arch"]:
        raise BmvccError(f"'{path}' is a library for {arch}, but the artifact was compiled for {target['arch']} "
                         f"(target {target['name']}); compile the model again")
    found = f"{size:,} bytes, compiled as {record['bytes']:,}" if size != record["bytes"] else "its sha256 differs"
    raise BmvccError(f"'{path}' is damaged or was replaced ({found}); compile the model again")


def _elf_arch(path: Path) -> str | None:
    """The architecture of an ELF file in `uname -m` terms, or None if it is not ELF."""
    with open(path, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    machine = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    return _ELF_MACHINES.get(machine, f"ELF machine {machine}")


def _is_dims(v) -> bool:
    return isinstance(v, list) and all(type(d) is int and d > 0 for d in v)


def _is_count(v) -> bool:
    return type(v) is int and v >= 0


def _is_number(v) -> bool:
    return type(v) in (int, float)


def _is_isa(v) -> bool:
    """target.isa (targets/isa.py): null (no LLVM CPU target), else {mcpu, features: {LLVM feature: cpuinfo flag}}."""
    return v is None or (isinstance(v, dict) and isinstance(v.get("mcpu"), str) and isinstance(v.get("features"), dict)
                         and all(isinstance(f, str) for f in v["features"].values()))


# dotted field -> (check, what it must be); a field's parent is listed before it
_SCHEMA = {
    "target": (lambda v: isinstance(v, dict), "an object"),
    "target.name": (lambda v: isinstance(v, str), "a string"),
    "target.arch": (lambda v: isinstance(v, str), "a string"),
    "target.device": (lambda v: isinstance(v, str), "a string"),
    "target.isa": (_is_isa, "null or an object with a string mcpu and features {name: cpuinfo flag}"),
    "input": (lambda v: isinstance(v, dict), "an object"),
    "input.shape": (lambda v: _is_dims(v) and len(v) == 4, "[N, C, H, W], positive integers"),
    "input.dtype": (lambda v: v == "float32", '"float32"'),
    "num_classes": (lambda v: _is_count(v) and v > 0, "a positive integer"),
    "num_weights": (_is_count, "a count"),
    "weights": (lambda v: isinstance(v, list) and all(isinstance(w, dict) and _is_dims(w.get("shape"))
                                                      and isinstance(w.get("dtype"), str) for w in v),
                "a list of {shape, dtype}"),
    "preprocessing": (lambda v: isinstance(v, dict) and all(_is_number(v.get(k)) for k in ("pixel_max", "mean", "std")),
                      "an object with numbers pixel_max, mean, std"),
    "dataset": (lambda v: v is None or (isinstance(v, dict) and isinstance(v.get("labels", {}), dict)),
                "null or an object with labels"),
    "config": (lambda v: v is None or isinstance(v, dict), "null or an object"),
    "files": (lambda v: isinstance(v, dict) and set(v) in ({MODULE, WEIGHTS}, set(RECORDED_FILES)) and all(
        isinstance(r, dict) and _is_count(r.get("bytes")) and isinstance(r.get("sha256"), str) for r in v.values()),
              f"{{bytes, sha256}} of {MODULE} and {WEIGHTS}, and of {', '.join(DEVICE_FILES)} in a GPU build"),
}


_OPTIONAL = {"target.isa"}  # absent in artifacts compiled before bmvcc recorded it


def _schema_problem(meta: dict) -> str | None:
    """The first field of `meta` that a reader would trip over, as a phrase; None if there is none."""
    for field, (check, expected) in _SCHEMA.items():
        parent, _, key = field.rpartition(".")
        holder = meta[parent] if parent else meta
        if key not in holder:
            if field in _OPTIONAL:
                continue
            return f"field '{field}' is missing"
        if not check(holder[key]):
            return f"field '{field}' is not {expected}"
    if meta["num_weights"] != len(meta["weights"]):
        return f"num_weights is {meta['num_weights']}, but {len(meta['weights'])} weights are listed"
    return None


def check_weights(params, meta: dict, outdir: Path) -> None:
    """`params` ({name: tensor}, as loaded from weights.bin) are w0, w1, ... of the shapes and dtypes
    metadata.json lists: weights of another model are refused before they reach the module."""
    expected = {f"w{i}": (tuple(w["shape"]), w["dtype"]) for i, w in enumerate(meta["weights"])}
    found = {str(name): (tuple(int(d) for d in t.shape), str(t.dtype)) for name, t in params.items()}
    if found != expected:
        name = next(n for n in sorted(expected.keys() | found.keys()) if expected.get(n) != found.get(n))
        have = "missing" if name not in found else f"{found[name][1]} {list(found[name][0])}"
        want = "no such weight" if name not in expected else f"{expected[name][1]} {list(expected[name][0])}"
        raise BmvccError(f"'{Path(outdir) / WEIGHTS}' does not hold this model's weights ({name}: {have}, expected "
                         f"{want}); compile the model again")
