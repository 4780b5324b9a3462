"""`bmvcc compile --dump-ir DIR`: the IR after the import, after every bmvcc pass and after every stage
after them (bmvcc/lowering.py), each as TVMScript in DIR/NN-NAME.py, numbered in the order they ran."""

from __future__ import annotations

from pathlib import Path

from .errors import BmvccError


class IRDump:
    """Callable (name, IRModule) -> None; does nothing without a directory."""

    def __init__(self, directory: Path | None = None):
        self.directory = None if directory is None else Path(directory)
        self.count = 0
        if self.directory is None:
            return
        if self.directory.exists() and not self.directory.is_dir():
            raise BmvccError(f"--dump-ir '{self.directory}' is a file; give a directory (created if missing)")
        if not self.directory.parent.is_dir():
            raise BmvccError(f"--dump-ir '{self.directory}': its parent directory does not exist; create it first")

    def __call__(self, name: str, mod) -> None:
        if self.directory is None:
            return
        self.directory.mkdir(exist_ok=True)
        (self.directory / f"{self.count:02d}-{name}.py").write_text(mod.script())
        self.count += 1
