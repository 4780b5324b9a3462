"""The artifact directory: what `bmvcc compile` writes and `bmvcc.runtime` reads.

    OUTDIR/
      model.so        the compiled Relax VM executable (TVM runtime module; host code + kernels)
      weights.bin     the weights, a TVM param dict (tvm.runtime.load_param_dict): w0, w1, ... in
                      the order main takes them after the image
      device.cubin, device.json   GPU builds only (bmvcc/gpu_build.py)
      metadata.json   config, input shape and dtype, classes, weight shapes and dtypes, versions,
                      target, source sha256, ..., and the size and sha256 of every other file

Readers go through `read_metadata`, which checks metadata.json's schema and every recorded file's size
and sha256 before anything loads model.so (native code: a damaged library can crash the process).

Written atomically: everything goes to a temporary sibling directory that is renamed into place
only when complete, so a failure leaves no OUTDIR and an existing OUTDIR stays untouched until the
new one is whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import BmvccError

MODULE = "model.so"
WEIGHTS = "weights.bin"
METADATA = "metadata.json"
FORMAT_VERSION = 2  # 2: "files" (size and sha256 of each file) and "weights" (shape and dtype of each)
DEVICE_BINARY = "device.cubin"  # GPU builds: the cubin, byte for byte as embedded in model.so
DEVICE_INFO = "device.json"  # GPU builds: arch, bmvcc kernels (W2A8 configs, knobs) and ptxas resources
RECORDED_FILES = (MODULE, WEIGHTS, DEVICE_BINARY, DEVICE_INFO)  # metadata.json records those present
_ELF_MACHINES = {3: "i386", 40: "arm", 62: "x86_64", 183: "aarch64", 243: "riscv64"}  # e_machine -> uname -m


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


# dotted field -> (check, what it must be); a field's parent is listed before it
_SCHEMA = {
    "target": (lambda v: isinstance(v, dict), "an object"),
    "target.name": (lambda v: isinstance(v, str), "a string"),
    "target.arch": (lambda v: isinstance(v, str), "a string"),
    "target.device": (lambda v: isinstance(v, str), "a string"),
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
              f"{{bytes, sha256}} of {MODULE} and {WEIGHTS}, and of {DEVICE_BINARY} and {DEVICE_INFO} in a GPU build"),
}


def _schema_problem(meta: dict) -> str | None:
    """The first field of `meta` that a reader would trip over, as a phrase; None if there is none."""
    for field, (check, expected) in _SCHEMA.items():
        parent, _, key = field.rpartition(".")
        holder = meta[parent] if parent else meta
        if key not in holder:
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
