"""Scratch folders that a later run can clean up after a killed one.

Every folder bmvcc creates for itself (the staging folder beside OUTDIR, the process's temporary
folder) is named `<prefix>bmvcc-<host>-pid<PID>-<mkdtemp suffix>`. A run that dies by kill -9 leaves
such folders behind; the next run removes those whose owner is gone: same host, PID no longer alive.
Nothing else is ever removed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())
_OWNED = re.compile(r".*bmvcc-(?P<host>[A-Za-z0-9._]+)-pid(?P<pid>\d+)-[a-z0-9_]{8}")  # mkdtemp: 8 chars


def make(folder: Path, prefix: str = "") -> Path:
    """A new folder in `folder` named as this process's scratch (mode 0700, as mkdtemp makes it)."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}bmvcc-{_HOST}-pid{os.getpid()}-", dir=folder))


def remove_dead(folder: Path) -> None:
    """Removes the scratch folders in `folder` of runs on this host that are no longer alive."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            owner = _OWNED.fullmatch(entry.name)
            if (owner and owner["host"] == _HOST and not _alive(int(owner["pid"]))
                    and entry.is_dir(follow_symlinks=False)):
                shutil.rmtree(entry.path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


@contextlib.contextmanager
def process_tempdir():
    """Points tempfile and TMPDIR (inherited by compilers and worker processes) at a scratch folder in
    the system temporary folder for the duration, and removes it afterwards."""
    system = Path(tempfile.gettempdir())
    remove_dead(system)
    folder = make(system)
    saved = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir, os.environ["TMPDIR"] = str(folder), str(folder)
    try:
        yield folder
    finally:
        tempfile.tempdir = saved[0]
        if saved[1] is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved[1]
        shutil.rmtree(folder, ignore_errors=True)
