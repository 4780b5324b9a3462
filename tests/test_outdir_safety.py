"""A user's files are never lost: which OUTDIRs compile may replace, interrupted and killed runs,
unwritable and full disks, usage errors; each a one-line error (exit 2) or, interrupted, exit 130."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from bmvcc import artifact
from bmvcc.cli import main

from conftest import cli_error, small_config

# torch prints FutureWarnings while importing the model; they are not bmvcc's lines.
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}
BUILDING = "[bmvcc] scheduling"  # printed inside artifact.staging: the staging folder exists


def start_compile(ckpt: Path, out: Path, scratch: Path) -> subprocess.Popen:
    """`python -m bmvcc.cli compile CKPT -o OUT`, its system temp folder `scratch`, stopped in the
    build (the staging folder beside OUT exists); returns the running process."""
    scratch.mkdir(exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "bmvcc.cli", "compile", str(ckpt), "-o", str(out)],
                            stderr=subprocess.PIPE, text=True, env={**ENV, "TMPDIR": str(scratch)})
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith(BUILDING):
            assert list(out.parent.glob(f".{out.name}.bmvcc-*")) and len(list(scratch.iterdir())) == 1, seen
            return proc
    proc.wait()
    pytest.fail(f"compile ended before building: {''.join(seen)}")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not line.startswith("[bmvcc] ")]


@pytest.fixture(scope="module")
def ckpt(checkpoint):
    return checkpoint(small_config())[0]


@pytest.fixture(scope="module")
def killed_then_interrupted(ckpt, tmp_path_factory):
    """A compile killed (kill -9) in its build, then the same compile stopped by SIGTERM in its build;
    -> (root, what the killed run left, the interrupted run's exit status and stderr)."""
    root = tmp_path_factory.mktemp("killed")
    proc = start_compile(ckpt, root / "out", root / "tmp")
    proc.kill()
    proc.wait()
    leftovers = sorted(p.name for p in root.glob(".out.*")) + sorted(p.name for p in (root / "tmp").iterdir())
    proc = start_compile(ckpt, root / "out", root / "tmp")
    proc.send_signal(signal.SIGTERM)
    status = proc.wait(timeout=120)
    return root, leftovers, status, proc.stderr.read()


def test_next_run_removes_what_a_killed_run_left(killed_then_interrupted):
    root, leftovers, _, _ = killed_then_interrupted
    assert len(leftovers) == 2, leftovers  # its staging folder and its temporary folder
    assert sorted(p.name for p in root.iterdir()) == ["tmp"] and not any((root / "tmp").iterdir())


def test_sigterm_cleans_up_and_exits_130(killed_then_interrupted):
    root, _, status, stderr = killed_then_interrupted
    assert status == 130
    assert error_lines(stderr) == ["error: interrupted by SIGTERM; unfinished output was removed, run the command again"]
    assert sorted(p.name for p in root.iterdir()) == ["tmp"] and not any((root / "tmp").iterdir())


def test_force_replaces_a_foreign_outdir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    with artifact.staging(out, force=True) as tmp:
        (tmp / artifact.MODULE).write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == [artifact.MODULE]


def test_foreign_outdir_refused(tmp_path, ckpt, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    (out / artifact.METADATA).write_text("{}")  # not bmvcc's: no bmvcc_version
    line = cli_error(capsys, ["compile", str(ckpt), "-o", str(out)])
    assert line == (f"error: output '{out}' holds files that are not a bmvcc artifact (metadata.json, notes.txt); "
                    "choose another -o, or pass --force to replace the directory")
    assert (out / "notes.txt").read_text() == "the user's"


def test_empty_outdir_accepted(tmp_path):
    (tmp_path / "out").mkdir()
    assert artifact.check_outdir(tmp_path / "out") == tmp_path / "out"


@pytest.mark.parametrize("force", [[], ["--force"]], ids=["no-force", "force"])
@pytest.mark.parametrize("where", [".", "..", "{dir}", "{ckpt}"])
def test_outdir_never_holds_the_source(tmp_path, ckpt, capsys, monkeypatch, force, where):
    (tmp_path / "m").mkdir()
    source = shutil.copy(ckpt, tmp_path / "m" / "m.pth")
    monkeypatch.chdir(tmp_path / "m")
    line = cli_error(capsys, ["compile", "m.pth", "-o", where.format(dir=tmp_path / "m", ckpt=source), *force])
    assert "contains the source 'm.pth', which writing the artifact would delete; choose another -o" in line, line
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["m", "m.pth"]


def in_tmpfs(folder: Path, mount_options: str, argv: list[str]) -> subprocess.CompletedProcess:
    """`bmvcc ARGV` with a fresh tmpfs (`mount_options`) at `folder`, in a private user and mount
    namespace (no privileges needed), then `ls -A folder` on stdout."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode:
        why = "needs unshare -rm (user and mount namespaces) to mount a tmpfs"
        if os.environ.get("CI"):  # CI's machines have them: there a missing one is a failure, not a skip
            pytest.fail(why)
        pytest.skip(why)
    folder.mkdir()
    script = 'mount -t tmpfs -o "$1" none "$0" || exit 99; shift; "$@" >&2; rc=$?; ls -A "$0"; exit $rc'
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, str(folder), mount_options,
                           sys.executable, "-m", "bmvcc.cli", *argv], capture_output=True, text=True, env=ENV)


def test_read_only_parent(ckpt, tmp_path):
    res = in_tmpfs(tmp_path / "ro", "ro", ["compile", str(ckpt), "-o", str(tmp_path / "ro" / "out")])
    assert res.returncode == 2 and error_lines(res.stderr) == [
        f"error: cannot write in '{tmp_path / 'ro'}' (permission denied or read-only); choose another -o"], res.stderr


def test_disk_full(ckpt, tmp_path):
    out = tmp_path / "full" / "out"
    res = in_tmpfs(tmp_path / "full", "size=64k", ["compile", str(ckpt), "-o", str(out)])  # the .so needs more
    assert res.returncode == 2 and error_lines(res.stderr) == [
        f"error: no space left on device while writing '{out}'; free some space or choose another -o"], res.stderr
    assert res.stdout == ""  # nothing left in the full folder


USAGE = {
    "unknown option": (["compile", "m.pth", "-o", "o", "--frobnicate"],
                       "error: no such option: --frobnicate (Possible options: --force); see 'bmvcc compile --help'"),
    "missing argument": (["compile"], "error: missing argument 'source'; see 'bmvcc compile --help'"),
    "missing option": (["run", "out"], "error: missing option '--input' / '-i'; see 'bmvcc run --help'"),
    "bad value": (["bench", "out", "--repeat", "x"],
                  "error: invalid value for '--repeat': Input should be a valid integer, unable to parse string "
                  "as an integer; see 'bmvcc bench --help'"),
    "unknown command": (["frobnicate"], "error: no such command 'frobnicate'; see 'bmvcc --help'"),
}


@pytest.mark.parametrize("argv, expected", USAGE.values(), ids=USAGE.keys())
def test_usage_error_is_one_line(capsys, argv, expected):
    assert cli_error(capsys, argv) == expected


def test_run_output_folder_missing(tmp_path, capsys):
    line = cli_error(capsys, ["run", str(tmp_path), "-i", "x.npy", "-o", str(tmp_path / "no" / "logits.npy")])
    assert line == f"error: output parent directory '{tmp_path / 'no'}' does not exist; create it first"


def test_export_onnx_replaces_only_its_own_file(ckpt, tmp_path, capsys):
    model = tmp_path / "m.onnx"
    model.write_text("the user's")
    line = cli_error(capsys, ["export-onnx", str(ckpt), "-o", str(model)])
    assert line == (f"error: output '{model}' exists and was not exported by bmvcc; choose another -o, "
                    "or pass --force to replace it")
    assert model.read_text() == "the user's"
    main(["export-onnx", str(ckpt), "-o", str(model), "--force"])
    main(["export-onnx", str(ckpt), "-o", str(model), "--batch", "1"])  # its own export: replaced without --force
    assert onnx.load(str(model)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    (tmp_path / "d.onnx").mkdir()
    line = cli_error(capsys, ["export-onnx", str(ckpt), "-o", str(tmp_path / "d.onnx")])
    assert line == f"error: output '{tmp_path / 'd.onnx'}' is a directory; name a file with -o"
