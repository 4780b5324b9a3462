"""Damaged or tampered artifacts: every command that reads one ends with one line naming the file and
the fix, and nothing loads model.so before metadata.json's schema and every recorded file's size and
sha256 have been checked. One small artifact is compiled for the host; each case damages a copy."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from bmvcc import artifact
from bmvcc.driver import CompileOptions, compile_model

from conftest import cli_error, small_config

FIX = "compile the model again"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, checkpoint):
    path, _ = checkpoint(small_config(depth=1))
    root = tmp_path_factory.mktemp("tamper")
    compile_model(path, root / "model", CompileOptions())
    np.save(root / "x.npy", np.zeros((1, 1, 28, 28), np.float32))
    return root


@pytest.fixture
def copy(compiled, tmp_path):
    """A fresh copy of the artifact to damage, and the `bmvcc run` arguments that read it."""
    out = tmp_path / "model"
    shutil.copytree(compiled / "model", out)
    return out, ["run", str(out), "--input", str(compiled / "x.npy")]


def _meta(out) -> dict:
    return json.loads((out / artifact.METADATA).read_text())


def _write_meta(out, meta) -> None:
    """metadata.json rewritten as is, without re-recording the files (write_metadata would)."""
    (out / artifact.METADATA).write_text(json.dumps(meta))


def _edit(field: str, value):
    def edit(meta):
        parent, _, key = field.partition(".")
        parent, key = (parent, key) if key else ("", parent)
        holder = meta[parent] if parent else meta
        if value is KeyError:
            del holder[key]
        else:
            holder[key] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (_edit("input", KeyError), "field 'input' is missing"),
    (_edit("target.arch", KeyError), "field 'target.arch' is missing"),
    (_edit("num_weights", 99), "num_weights is 99, but "),
    (_edit("num_weights", "9"), "field 'num_weights' is not a count"),
    (_edit("input.shape", [1, 28, 28]), "field 'input.shape' is not [N, C, H, W]"),
    (_edit("input.dtype", "float64"), "field 'input.dtype' is not \"float32\""),
    (_edit("num_classes", None), "field 'num_classes' is not a positive integer"),
    (_edit("weights", [{"shape": [1]}]), "field 'weights' is not a list of {shape, dtype}"),
    (_edit("files", KeyError), "field 'files' is missing"),
    (_edit("files.model.so", KeyError), "field 'files' is not"),
    (_edit("dataset", {"labels": ["a"]}), "field 'dataset' is not"),
    (_edit("target.isa", {"mcpu": "znver4", "features": ["avx2"]}), "field 'target.isa' is not"),
])
def test_ill_formed_metadata_is_one_line(copy, capsys, edit, message):
    out, argv = copy
    meta = _meta(out)
    edit(meta)
    _write_meta(out, meta)
    err = cli_error(capsys, argv)
    assert f"'{out / artifact.METADATA}' is damaged ({message}" in err and err.endswith(FIX)


@pytest.mark.parametrize("content, message", [
    (b"[1, 2]", "corrupt (not a JSON object)"),
    (b'{"format_version": 2, "input": ', "corrupt (Expecting value"),
    (b"\xff\xfe\x00garbage", "corrupt ("),
])
def test_metadata_that_is_not_an_object_is_one_line(copy, capsys, content, message):
    out, argv = copy
    (out / artifact.METADATA).write_bytes(content)
    err = cli_error(capsys, argv)
    assert f"'{out / artifact.METADATA}' is" in err and message in err and err.endswith(FIX)


def _truncate(size: int):
    def damage(path):
        with open(path, "r+b") as f:
            f.truncate(size)
    return damage


def _garbage(path):
    """Same size, other bytes: only the checksum can tell."""
    path.write_bytes(np.random.default_rng(0).integers(0, 256, path.stat().st_size, np.uint8).tobytes())


@pytest.mark.parametrize("name", [artifact.MODULE, artifact.WEIGHTS])
@pytest.mark.parametrize("damage, message", [
    (_truncate(0), "0 bytes, compiled as "),
    (_truncate(1000), "1,000 bytes, compiled as "),
    (_garbage, "its sha256 differs"),
    (lambda path: path.unlink(), None),
])
def test_damaged_files_are_refused_before_loading(copy, capsys, name, damage, message):
    out, argv = copy
    damage(out / name)
    err = cli_error(capsys, argv)
    if message is None:
        assert err == f"error: '{out / name}' is missing; {FIX}"
    else:
        assert f"'{out / name}' is damaged or was replaced ({message}" in err and err.endswith(FIX)


def test_model_so_truncated_to_50kb_is_one_line_not_sigbus(copy):
    """Loading a truncated library maps pages beyond its end: SIGBUS, no message. In a subprocess, so
    a crash fails this test instead of killing pytest."""
    out, argv = copy
    _truncate(50_000)(out / artifact.MODULE)
    done = subprocess.run([sys.executable, "-m", "bmvcc.cli", *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert done.stderr.splitlines() == [f"error: '{out / artifact.MODULE}' is damaged or was replaced "
                                        f"(50,000 bytes, compiled as {_meta(out)['files']['model.so']['bytes']:,}); {FIX}"]


def test_model_so_for_another_architecture_names_both(copy, capsys):
    """An aarch64 library in an x86-64 artifact: the ELF header says which machine it is for (only the
    header is read before the checksum refuses it, so an x86-64 library relabelled EM_AARCH64 stands in)."""
    out, argv = copy
    data = bytearray((out / artifact.MODULE).read_bytes())
    data[18:20] = (183).to_bytes(2, "little")  # e_machine EM_AARCH64
    (out / artifact.MODULE).write_bytes(bytes(data))
    err = cli_error(capsys, argv)
    arch = _meta(out)["target"]["arch"]
    assert err == (f"error: '{out / artifact.MODULE}' is a library for aarch64, but the artifact was compiled for "
                   f"{arch} (target host); {FIX}")


def test_weights_of_another_model_are_refused_by_name(copy, capsys):
    """weights.bin of another model, even with metadata.json's checksums re-recorded to match it."""
    import tvm

    out, argv = copy
    params = {f"w{i}": tvm.runtime.tensor(np.ones((4, 8), np.float32)) for i in range(9)}
    tvm.runtime.save_param_dict_to_file(params, str(out / artifact.WEIGHTS))
    assert "damaged or was replaced" in cli_error(capsys, argv)
    artifact.write_metadata(out, {k: v for k, v in _meta(out).items() if k != "files"})
    err = cli_error(capsys, argv)
    assert f"'{out / artifact.WEIGHTS}' does not hold this model's weights (w0: float32 [4, 8], expected " in err
    assert err.endswith(FIX)


def test_every_command_that_reads_an_artifact_checks_it(copy, capsys, tmp_path):
    out, _ = copy
    _garbage(out / artifact.WEIGHTS)
    expected = f"error: '{out / artifact.WEIGHTS}' is damaged or was replaced (its sha256 differs); {FIX}"
    png = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.zeros((28, 28), np.uint8)).save(png)
    for argv in (["predict", str(out), str(png)], ["bench", str(out)], ["inspect", str(out)], ["report", str(out)],
                 ["eval", str(out), "--dataset", "organamnist", "--data-dir", str(tmp_path)]):
        assert cli_error(capsys, argv) == expected, argv


def _as_gpu_artifact(out):
    """The copy with the device files of a GPU build, recorded as a GPU build records them."""
    (out / artifact.DEVICE_BINARY).write_bytes(b"\x7fELF" + bytes(60))
    (out / artifact.DEVICE_INFO).write_text(json.dumps({"arch": "sm_87", "bmvcc_kernels": {}, "calls": {},
                                                        "resources": {}}))
    (out / artifact.DEVICE_PTX).write_text("//\n")
    (out / artifact.DEVICE_DEFINITIONS).write_text("{}")
    artifact.write_metadata(out, {k: v for k, v in _meta(out).items() if k != "files"})


@pytest.mark.parametrize("command", ["inspect", "report"])
def test_inspect_and_report_with_bad_device_json_or_metadata(copy, capsys, command):
    out, _ = copy
    _as_gpu_artifact(out)
    (out / artifact.DEVICE_INFO).write_text("{not json")
    err = cli_error(capsys, [command, str(out)])
    assert f"'{out / artifact.DEVICE_INFO}' is damaged or was replaced (" in err and err.endswith(FIX)
    meta = _meta(out)
    del meta["files"][artifact.DEVICE_INFO]
    _write_meta(out, meta)
    err = cli_error(capsys, [command, str(out)])
    assert f"'{out / artifact.METADATA}' is damaged (field 'files' is not " in err and err.endswith(FIX)
    (out / artifact.METADATA).write_text("null")
    assert "is corrupt (not a JSON object)" in cli_error(capsys, [command, str(out)])


def test_a_host_artifact_is_not_a_gpu_artifact(copy, capsys):
    out, _ = copy
    assert "it is not a GPU artifact" in cli_error(capsys, ["inspect", str(out)])
