"""Reproducible builds: the same checkpoint compiled twice, from different folders (source directory,
cwd, -o parent, TMPDIR) and with different hash seeds, gives byte-identical artifact files, none of
which records a directory of the build."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import small_config


def _start_compile(target: str, root, source: str, output: str, hash_seed: str) -> subprocess.Popen:
    """`bmvcc compile` in its own process, run in root/cwd with TMPDIR=root/tmp (paths may be relative to that cwd)."""
    (root / "cwd").mkdir(parents=True)
    (root / "tmp").mkdir()
    (root / "out").mkdir()
    env = {**os.environ, "TMPDIR": str(root / "tmp"), "PYTHONHASHSEED": hash_seed}
    return subprocess.Popen([sys.executable, "-m", "bmvcc.cli", "compile", source, "-t", target, "-o", output],
                            cwd=root / "cwd", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["host", "aarch64", "jetson-orin-nano"])
def test_builds_in_different_folders_are_byte_identical(target, checkpoint, tmp_path):
    ckpt, _ = checkpoint(small_config())
    first, second = tmp_path / "first", tmp_path / "second-build"
    (second / "src").mkdir(parents=True)
    shutil.copy(ckpt, second / "src" / ckpt.name)  # the same file (name and bytes) in another directory
    builds = [_start_compile(target, first, str(ckpt), str(first / "out" / "art"), hash_seed="1"),  # absolute paths
              _start_compile(target, second, f"../src/{ckpt.name}", "../out/art", hash_seed="2")]  # relative paths
    for build in builds:  # both run in parallel
        _, err = build.communicate(timeout=300)
        assert build.returncode == 0, err[-3000:]
    a, b = first / "out" / "art", second / "out" / "art"
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert {"model.so", "weights.bin", "metadata.json"} <= set(names)
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert json.loads((a / "metadata.json").read_text())["source"] == {"name": ckpt.name, "sha256": digest, "kind": ".pth"}
    for name in names:
        data = (a / name).read_bytes()
        assert data == (b / name).read_bytes(), f"{name} differs between the two builds"
        for root in (first, second, ckpt.parent):  # cwd, -o parent, TMPDIR and source directory are all below these
            assert str(root).encode() not in data, f"{name} records the build directory {root}"
