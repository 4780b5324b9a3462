"""The `bmvcc` command line end to end on the bundled example, its input errors, and OUTDIR rules."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bmvcc
from bmvcc import artifact, targets
from bmvcc.checkpoint import build_model, infer_config, load_state_dict
from bmvcc.cli import main
from bmvcc.errors import BmvccError, InternalError

from conftest import cli_error

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CKPT = EXAMPLES / "bitmedvit_digits.pth"
IMAGES = EXAMPLES / "digits_test.npy"
LABELS = EXAMPLES / "digits_test_labels.npy"


def previous_artifact(out: Path) -> None:
    """An older artifact in `out`, which a compile into `out` may replace (its metadata.json is bmvcc's)."""
    out.mkdir()
    (out / artifact.MODULE).write_text("previous artifact")
    (out / artifact.METADATA).write_text(json.dumps({"bmvcc_version": "0.0.1"}))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The Quick start's compile through the CLI, into an existing OUTDIR, with the JSON summary and the IR
    dumped beside it: `bmvcc compile examples/bitmedvit_digits.pth -o OUT --batch 4 --json --dump-ir ir`
    -> (OUT, summary)."""
    out = tmp_path_factory.mktemp("cli") / "digits"
    previous_artifact(out)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        main(["compile", str(CKPT), "-o", str(out), "--batch", "4", "--json", "--dump-ir", str(out.parent / "ir")])
    return out, json.loads(stdout.getvalue())


def test_compile_writes_artifact(digits):
    out, summary = digits
    assert summary["output"] == str(out) and summary["seconds"] > 0
    # The existing OUTDIR was replaced whole.
    assert sorted(p.name for p in out.iterdir()) == sorted([artifact.MODULE, artifact.WEIGHTS, artifact.METADATA])
    meta = artifact.read_metadata(out)
    assert meta["config"]["multi_query"] and not meta["config"]["fp_attn"]
    assert meta["input"]["shape"] == [4, 1, 28, 28]
    # mkdtemp makes 0700 directories; OUTDIR must follow the umask like any directory the user creates.
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask


def test_dump_ir_writes_every_pass_and_stage(digits):
    from bmvcc.passes.pipeline import passes

    out, _ = digits
    files = sorted((out.parent / "ir").iterdir())
    ran = ["import", *(name for name, _ in passes(device="cpu")), "externalize_weights", "fuse", "schedule"]
    assert [f.name for f in files] == [f"{i:02d}-{name}.py" for i, name in enumerate(ran)]
    assert "R.call_tir" not in files[0].read_text() and "w2a8" in files[ran.index("quantize_bitlinear")].read_text()
    assert "T.prim_func" in files[-1].read_text() and "T.vectorized" in files[-1].read_text()  # scheduled


def test_dump_ir_into_a_file(tmp_path, capsys):
    (tmp_path / "ir").write_text("")
    line = cli_error(capsys, ["compile", str(CKPT), "-o", str(tmp_path / "out"), "--dump-ir", str(tmp_path / "ir")])
    assert "--dump-ir" in line and "is a file" in line and not (tmp_path / "out").exists()


def test_run_matches_pytorch_and_labels(digits, tmp_path, capsys):
    main(["run", str(digits[0]), "--input", str(IMAGES), "--output", str(tmp_path / "logits.npy")])
    assert "saved logits (16, 10)" in capsys.readouterr().out
    logits = np.load(tmp_path / "logits.npy")
    state = load_state_dict(CKPT)
    model = build_model(state, infer_config(state))
    with torch.no_grad():
        ref = model(torch.from_numpy(np.load(IMAGES))).numpy()
    # Tolerance: see RTOL_LOGITS in test_frontend.py (fp32 reassociation plus rare int8 code flips).
    assert np.abs(logits - ref).max() <= 1e-2 * np.abs(ref).max()
    np.testing.assert_array_equal(logits.argmax(1), ref.argmax(1))
    # The trained example gets most of its bundled test images right (test accuracy ~0.9+).
    assert (logits.argmax(1) == np.load(LABELS)).mean() >= 0.75


def test_run_prints_a_table(digits, tmp_path, capsys):
    main(["run", str(digits[0]), "-i", str(IMAGES), "-o", str(tmp_path / "logits.npy")])
    main(["run", str(digits[0]), "-i", str(IMAGES)])
    lines = capsys.readouterr().out.splitlines()[1:]
    assert lines[0].split() == ["image", "argmax", "logit", "margin"] and "-o FILE.npy" in lines[-1]
    logits = np.load(tmp_path / "logits.npy")
    rows = np.array([line.split() for line in lines[1:-1]], dtype=float)
    top2 = np.sort(logits, axis=1)[:, ::-1][:, :2]
    np.testing.assert_array_equal(rows[:, :2], np.c_[np.arange(16), logits.argmax(1)])
    np.testing.assert_allclose(rows[:, 2:], np.c_[top2[:, 0], top2[:, 0] - top2[:, 1]], atol=1e-4)  # 4 decimals


def test_targets_lists_every_target(capsys):
    main(["targets"])
    rows = [line.split()[:3] for line in capsys.readouterr().out.splitlines()]
    assert [row[0] for row in rows] == targets.names() and len(rows) == 8
    assert all(row[1] in ("cpu", "cuda") and row[2] in ("x86_64", "aarch64") for row in rows)


def test_readme_lists_the_targets_as_printed(capsys):
    main(["targets"])
    printed = [line.split(None, 3) for line in capsys.readouterr().out.splitlines()]
    this = {"arch": os.uname().machine, "cores": str(len(os.sched_getaffinity(0)))}
    readme = (EXAMPLES.parent / "README.md").read_text()
    rows = re.findall(r"^\| `([a-z0-9-]+)` \| (cpu|cuda) \| ([^|]+) \| ([^|]+) \|$", readme, re.M)
    assert [[name, device, arch.strip().replace("this machine", this["arch"]),
             text.strip().replace("N cores", f"{this['cores']} cores")] for name, device, arch, text in rows] == printed


# ---- answers at once: neither torch nor TVM imported (benchmarks/bench_cli_startup.py times them) ----


# name: (arguments, a piece of the one error line; None: the command succeeds). {tmp} holds damaged files
# (damaged.pth, .pt2 and .onnx, random bytes), a plain file and notes.txt; {artifact} is the digits artifact.
LIGHT = {
    "help": (["--help"], None),
    "version": (["--version"], None),
    "targets": (["targets"], None),
    "unknown-option": (["targets", "--bogus"], "no such option"),
    "missing-checkpoint": (["compile", "{tmp}/missing.pth", "-o", "{tmp}/out"], "does not exist"),
    "unknown-target": (["compile", "{tmp}/missing.onnx", "-o", "{tmp}/out", "-t", "nope"], "unknown target 'nope'"),
    "compile-batch-0": (["compile", "{tmp}/missing.pth", "-o", "{tmp}/out", "--batch", "0"], "'--batch'"),
    "compile-heads-0": (["compile", str(CKPT), "-o", "{tmp}/out", "--heads", "0"], "'--heads'"),
    "compile-image-size-0": (["compile", str(CKPT), "-o", "{tmp}/out", "--image-size", "0"], "'--image-size'"),
    "compile-unknown-dataset": (["compile", str(CKPT), "-o", "{tmp}/out", "--dataset", "digits"],
                                "'digits' is not a MedMNIST 2D data set"),
    "compile-onnx-with-heads": (["compile", "{tmp}/damaged.onnx", "-o", "{tmp}/out", "--heads", "2"],
                                "--heads does not apply to an ONNX model"),
    "compile-damaged-pth": (["compile", "{tmp}/damaged.pth", "-o", "{tmp}/out"], "is not a PyTorch checkpoint"),
    "compile-text-file": (["compile", "{tmp}/notes.txt", "-o", "{tmp}/out"], "is not a PyTorch checkpoint"),
    "compile-damaged-pt2": (["compile", "{tmp}/damaged.pt2", "-o", "{tmp}/out"], "is not a readable torch.export program"),
    "compile-damaged-onnx": (["compile", "{tmp}/damaged.onnx", "-o", "{tmp}/out"], "is not an ONNX model"),
    "compile-not-a-db": (["compile", str(CKPT), "-o", "{tmp}/out", "--db", "{tmp}"], "is not a bmvcc tuning database"),
    "tune-missing-checkpoint": (["tune", "{tmp}/missing.pth", "--db", "{tmp}/db"], "does not exist"),
    "tune-db-is-a-file": (["tune", str(CKPT), "--db", "{tmp}/plain"], "is a file"),
    "tune-rpc-key-alone": (["tune", str(CKPT), "--db", "{tmp}/db", "--rpc-key", "orin"], "go together"),
    "tune-damaged-pth": (["tune", "{tmp}/damaged.pth", "--db", "{tmp}/db"], "is not a PyTorch checkpoint"),
    "export-missing-checkpoint": (["export-onnx", "{tmp}/missing.pth", "-o", "{tmp}/m.onnx"], "does not exist"),
    "export-not-a-state-dict": (["export-onnx", "{tmp}/damaged.onnx", "-o", "{tmp}/m.onnx"], "is not a BitMedViT state dict"),
    "export-output-not-onnx": (["export-onnx", str(CKPT), "-o", "{tmp}/m.txt"], "must end in .onnx"),
    "export-output-exists": (["export-onnx", str(CKPT), "-o", "{tmp}/damaged.onnx"], "was not exported by bmvcc"),
    "export-opset-13": (["export-onnx", str(CKPT), "-o", "{tmp}/m.onnx", "--opset", "13"], "--opset 13 is too old"),
    "eval-not-an-artifact": (["eval", "{tmp}", "--dataset", "pathmnist", "--data-dir", "{tmp}"], "is not a bmvcc artifact"),
    "eval-missing-ckpt": (["eval", "{artifact}", "--dataset", "pathmnist", "--data-dir", "{tmp}", "--ckpt",
                           "{tmp}/missing.pth"], "does not exist"),
    "eval-onnx-ckpt": (["eval", "{artifact}", "--dataset", "pathmnist", "--data-dir", "{tmp}", "--ckpt",
                        "{tmp}/damaged.onnx"], "is an ONNX model; pass the PyTorch checkpoint"),
    "bench-not-an-artifact": (["bench", "{tmp}"], "is not a bmvcc artifact"),
    "run-missing-input": (["run", "{artifact}", "-i", "{tmp}/missing.npy"], "does not exist"),
    "run-output-not-npy": (["run", "{artifact}", "-i", str(IMAGES), "-o", "{tmp}/logits.txt"], "must end in .npy"),
    "predict-missing-image": (["predict", "{artifact}", "{tmp}/missing.png"], "does not exist"),
    "report-not-an-artifact": (["report", "{tmp}"], "is not a bmvcc artifact"),
    "verify-cpu-artifact": (["verify", "{artifact}"], "checks GPU builds"),
}


@pytest.mark.parametrize("args, needle", LIGHT.values(), ids=LIGHT.keys())
def test_answers_without_torch_or_tvm(digits, tmp_path, args, needle):
    for name in ("damaged.pth", "damaged.pt2", "damaged.onnx"):
        (tmp_path / name).write_bytes(b"\x07" + os.urandom(999))  # not the first byte of any of the three kinds
    (tmp_path / "notes.txt").write_text("epoch 10: val acc 0.91\n")
    (tmp_path / "plain").write_text("a file")
    argv = [a.format(tmp=tmp_path, artifact=digits[0]) for a in args]
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}  # -X importtime: one stderr line per module imported
    proc = subprocess.run([sys.executable, "-m", "bmvcc.cli", *argv], capture_output=True, text=True, env=env,
                          timeout=60)
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "typer" in imported and not imported & {"torch", "tvm", "tvm_ffi"}
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    if needle is None:
        assert proc.returncode == 0 and errors == [], proc.stderr
    else:
        assert proc.returncode == 2 and len(errors) == 1 and needle in errors[0], errors


def test_version_from_package_metadata(capsys):
    main(["--version"])  # pyproject.toml's version, which must match the package's
    assert capsys.readouterr().out == f"bmvcc {bmvcc.__version__}\n"


# ---- the README's accuracy on the 450 held-out digits -------------------------------------------


def test_shipped_holdout_is_train_examples_split(monkeypatch):
    from sklearn.datasets import load_digits

    monkeypatch.syspath_prepend(str(EXAMPLES))
    from accuracy import HOLDOUT, to_model_input
    from train_example import split

    data = load_digits()
    _, test = split(data.target)
    holdout = np.load(HOLDOUT)
    assert holdout["images"].dtype == np.uint8 and holdout["images"].shape == (450, 8, 8)
    np.testing.assert_array_equal(holdout["images"], data.images[test])
    np.testing.assert_array_equal(holdout["labels"], data.target[test])
    np.testing.assert_array_equal(to_model_input(holdout["images"][:16]), np.load(IMAGES))  # the Quick start's 16


def test_compiled_example_reaches_the_readmes_accuracy(digits):
    readme = (EXAMPLES.parent / "README.md").read_text()
    figure, correct, total = re.search(r"\*\*(0\.\d+)\*\* \((\d+) of (\d+)\)", readme).groups()
    proc = subprocess.run([sys.executable, str(EXAMPLES / "accuracy.py"), str(digits[0])], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"accuracy {figure} ({correct} of {total} held-out digits)\n"


# ---- user errors of `bmvcc run` ---------------------------------------------------------------


INPUTS = {  # name: (writes the file or not, what the error line says)
    "missing": (lambda p: None, ["does not exist", "check the path"]),
    "text": (lambda p: p.write_text("0.1, 0.2, 0.3\n"), ["is not a .npy array", "numpy.save"]),
    "no-channel-axis": (lambda p: np.save(p, np.zeros((2, 28, 28), np.float32)), ["has shape (2, 28, 28)", "NCHW"]),
    "wrong-channels": (lambda p: np.save(p, np.zeros((2, 3, 28, 28), np.float32)), ["has shape (2, 3, 28, 28)", "NCHW"]),
    "float64": (lambda p: np.save(p, np.zeros((2, 1, 28, 28), np.float64)), ["dtype is float64", "astype(np.float32)"]),
    "uint8": (lambda p: np.save(p, np.zeros((2, 1, 28, 28), np.uint8)), ["dtype is uint8", "astype(np.float32)"]),
    "object-array": (lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True),
                     ["is not a .npy array"]),
}


@pytest.mark.parametrize("make, needles", INPUTS.values(), ids=INPUTS.keys())
def test_run_input_errors(digits, tmp_path, capsys, make, needles):
    path = tmp_path / "x.npy"
    make(path)
    line = cli_error(capsys, ["run", str(digits[0]), "--input", str(path)])
    for needle in needles:
        assert needle in line, line


def test_run_not_an_artifact(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 28, 28), np.float32))
    line = cli_error(capsys, ["run", str(tmp_path), "-i", str(tmp_path / "x.npy")])
    assert "not a bmvcc artifact" in line and "bmvcc compile" in line


# ---- OUTDIR: atomic, untouched on failure ---------------------------------------------------


def test_failed_compile_leaves_existing_outdir_untouched(tmp_path, capsys):
    out = tmp_path / "out"
    previous_artifact(out)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00" * 100)
    assert "is not a" in cli_error(capsys, ["compile", str(bad), "-o", str(out)])  # the checkpoint's error
    assert sorted(p.name for p in out.iterdir()) == [artifact.METADATA, artifact.MODULE]
    assert (out / artifact.MODULE).read_text() == "previous artifact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth", "out"]


def test_staging_failure_inside_build_keeps_outdir(tmp_path):
    # A failure while the artifact is being written (e.g. the build) removes the staging directory.
    out = tmp_path / "out"
    previous_artifact(out)
    with pytest.raises(BmvccError, match="build failed"):
        with artifact.staging(out) as tmp:
            (tmp / artifact.MODULE).write_bytes(b"partial")
            raise BmvccError("build failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / artifact.MODULE).read_text() == "previous artifact"


def test_output_is_a_file(tmp_path, capsys):
    (tmp_path / "out").write_text("not a directory")
    line = cli_error(capsys, ["compile", str(CKPT), "-o", str(tmp_path / "out")])
    assert "is not a directory" in line and "choose another -o" in line


def test_output_parent_missing(tmp_path, capsys):
    line = cli_error(capsys, ["compile", str(CKPT), "-o", str(tmp_path / "no" / "out")])
    assert "does not exist" in line and "create it first" in line
    assert not (tmp_path / "no").exists()


# ---- as a real process: exit status and stderr of the installed entry point ------------------


@pytest.mark.parametrize("args, needle", [
    (["compile", "{tmp}/missing.pth", "-o", "{tmp}/out"], "does not exist"),
    (["run", "{digits}", "-i", "{tmp}/garbage.pth"], "is not a .npy array"),
], ids=["missing-checkpoint", "garbage-input"])
def test_process_error(digits, tmp_path, args, needle):
    (tmp_path / "garbage.pth").write_bytes(os.urandom(1000))
    argv = [a.format(tmp=tmp_path, digits=digits[0]) for a in args]
    proc = subprocess.run([sys.executable, "-m", "bmvcc.cli", *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("[bmvcc] ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_usage_error_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compile"])
    assert e.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_internal_error_prints_the_traceback_and_asks_for_a_report(tmp_path, capsys, monkeypatch):
    """A broken invariant of bmvcc itself (no input reaches one: an internal stage is made to raise it) is not
    the user's mistake: the traceback a bug report needs, the request to report it, exit status 3, no artifact."""
    import bmvcc.frontend

    def broken_load(*args, **kwargs):
        raise InternalError("the loaded model has no input shape")

    monkeypatch.setattr(bmvcc.frontend, "load_source", broken_load)
    with pytest.raises(SystemExit) as exit_info:
        main(["compile", str(CKPT), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 3, err
    assert "Traceback (most recent call last)" in err and "in compile_model" in err and "in broken_load" in err
    assert err.rstrip().endswith("bmvcc.errors.InternalError: the loaded model has no input shape; "
                                 "this is a bmvcc bug: please report it with this traceback")
    assert list(tmp_path.iterdir()) == []
