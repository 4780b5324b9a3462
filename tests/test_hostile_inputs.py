"""Small hostile files through the real CLI: each ends in one error line before any large allocation,
no payload runs, and the float dtypes a checkpoint may legitimately have still compile correctly.

Every file is made here and is a few KB to a few MB; the cases that need an artifact share one, compiled
from a bfloat16 checkpoint (which is also the dtype test's compile).
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
import zlib

import numpy as np
import pytest
import torch

from bmvcc import resources
from bmvcc.cli import main
from bmvcc.frontend import load_source
from bmvcc.model import BitMedViT, ViTConfig

from conftest import cli_error, make_model, small_config

CFG = small_config(num_classes=11)  # 1 channel, 11 classes: organamnist's, for the eval case


@pytest.fixture
def state():
    return make_model(CFG).state_dict()


def _save(tmp_path, obj, **kwargs):
    path = tmp_path / "hostile.pth"
    torch.save(obj, path, **kwargs)
    return path


def _compile_error(capsys, tmp_path, path, *options):
    out = tmp_path / "out"
    line = cli_error(capsys, ["compile", str(path), "-o", str(out), *options])
    assert not out.exists()
    return line


def _rounded_model(dtype):
    """The reference: make_model(CFG) with every weight rounded to `dtype` and back to float32."""
    model = make_model(CFG)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).float())
    return model


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A bfloat16 checkpoint compiled through the CLI: (artifact directory, its PyTorch reference)."""
    root = tmp_path_factory.mktemp("hostile")
    path = root / "bf16.pth"
    torch.save({k: v.bfloat16() for k, v in make_model(CFG).state_dict().items()}, path)
    main(["compile", str(path), "-o", str(root / "out")])
    return root / "out", _rounded_model(torch.bfloat16)


# --- unbounded resources ---------------------------------------------------------------------------

def test_a_far_layer_index_is_refused_before_building(capsys, tmp_path, state):
    state["transformer.layers.99999999.0.Wqkv.weight"] = torch.zeros(3)  # once: 1.7 GB after 95 s and growing
    line = _compile_error(capsys, tmp_path, _save(tmp_path, state))
    assert "transformer layer 99999999 but no layer 2" in line and "0..depth-1" in line


def test_a_layer_index_too_long_to_be_one_is_an_unexpected_key(capsys, tmp_path, state):
    key = "transformer.layers.12345678901234567890.0.Wqkv.weight"
    state[key] = torch.zeros(3)
    assert f"unexpected key '{key}'" in _compile_error(capsys, tmp_path, _save(tmp_path, state))


def test_stride_0_tensor_is_refused_by_name(capsys, tmp_path, state):
    # torch.save writes expand's one-element storage with size 10**12 and stride 0: a 6 KB file.
    state["transformer.layers.0.3.net.0.weight"] = torch.zeros(1).expand(10**6, 10**6)
    path = _save(tmp_path, state)
    assert path.stat().st_size < 100_000
    line = _compile_error(capsys, tmp_path, path)
    assert "'transformer.layers.0.3.net.0.weight' claims 1,000,000,000,000 values but its storage holds 1" in line
    assert ".contiguous()" in line


def test_an_overlapping_view_is_refused_by_name(capsys, tmp_path, state):
    state["classifier.1.weight"] = torch.randn(42).as_strided((11, 32), (1, 1))  # row i is values i..i+31
    line = _compile_error(capsys, tmp_path, _save(tmp_path, state))
    assert "'classifier.1.weight' claims 352 values but its storage holds 42" in line


def test_a_consistent_model_too_large_for_memory_is_refused(capsys, tmp_path):
    # dim 1, one head, 1000x1000 tokens of 1 px: a 4 MB state dict whose attention scores need 8 TB.
    cfg = ViTConfig(image_size=1000, patch_size=1, channels=1, num_classes=2, dim=1, depth=1, heads=1, mlp_dim=1,
                    multi_query=True, fp_attn=False)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in BitMedViT(cfg).state_dict().items()}
    path = _save(tmp_path, {k: torch.ones(s) for k, s in shapes.items()})
    need = resources.bitmedvit_activations(cfg)
    assert need > 8e12 > resources.machine_memory()
    line = _compile_error(capsys, tmp_path, path)
    assert f"compiling this model needs about {resources.human(need)} of memory even at batch 1" in line
    assert f"this machine has {resources.human(resources.machine_memory())}" in line


def test_a_batch_too_large_for_memory_is_refused(capsys, tmp_path, checkpoint):
    path, _ = checkpoint(CFG)
    line = _compile_error(capsys, tmp_path, path, "--batch", "1000000000")
    assert line.startswith("error: compiling this model at batch 1000000000 needs about ")
    assert " TB of memory, this machine has " in line and "use a smaller --batch (at most " in line


def _npy_claiming(path, shape, data: bytes):
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": shape})
        f.write(data)
    return path


def test_a_npy_header_claiming_285_tib_is_refused(artifact, capsys, tmp_path):
    path = _npy_claiming(tmp_path / "x.npy", (99_966_000_000, 1, 28, 28), bytes(3136))  # 313 TB = 285 TiB
    for argv in (["run", str(artifact[0]), "--input", str(path)], ["predict", str(artifact[0]), str(path)]):
        line = cli_error(capsys, argv)
        assert "claims float32 (99966000000, 1, 28, 28) (313 TB) but holds 3.1 kB of data" in line
        assert "truncated or damaged" in line


def test_a_npy_shorter_than_its_header_is_refused(artifact, capsys, tmp_path):
    path = _npy_claiming(tmp_path / "x.npy", (2, 1, 28, 28), bytes(3136))  # one image of the two claimed
    line = cli_error(capsys, ["run", str(artifact[0]), "--input", str(path)])
    assert "claims float32 (2, 1, 28, 28) (6.3 kB) but holds 3.1 kB" in line


def _png_1bit(path, width: int, height: int):
    """A valid 1-bit grayscale PNG of zeros, written chunk by chunk (PIL would hold it as 1 byte/pixel)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    deflate, row = zlib.compressobj(9), bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    idat = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_a_png_decompression_bomb_is_refused(artifact, capsys, tmp_path):
    path = _png_1bit(tmp_path / "bomb.png", 30000, 30000)  # 900 M pixels in about 110 kB
    assert path.stat().st_size < 1_000_000
    line = cli_error(capsys, ["predict", str(artifact[0]), str(path)])
    assert "has more than 89,478,485 pixels (PIL's limit against decompression bombs)" in line
    assert "downscale it, the model takes 28x28" in line


def test_eval_on_an_empty_split_is_one_line(artifact, capsys, tmp_path):
    np.savez(tmp_path / "organamnist.npz", test_images=np.zeros((0, 28, 28), np.uint8),
             test_labels=np.zeros((0, 1), np.uint8))
    line = cli_error(capsys, ["eval", str(artifact[0]), "--dataset", "organamnist", "--data-dir", str(tmp_path)])
    assert "organamnist.npz' has no test images" in line and "--split" in line


def test_eval_npz_claiming_terabytes_is_one_line(artifact, capsys, tmp_path):
    """An npz whose test_images header claims 10^11 images (78 TB) but holds one: refused from the header."""
    import zipfile

    header = tmp_path / "images.npy"
    with open(header, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (10**11, 28, 28)})
        f.write(bytes(784))
    with zipfile.ZipFile(tmp_path / "organamnist.npz", "w") as z:
        z.write(header, "test_images.npy")
        with z.open("test_labels.npy", "w") as f:
            np.save(f, np.zeros((1, 1), np.uint8))
    line = cli_error(capsys, ["eval", str(artifact[0]), "--dataset", "organamnist", "--data-dir", str(tmp_path)])
    assert "claims uint8 (100000000000, 28, 28) (78 TB) for test_images but holds 784 bytes" in line
    assert "download it again" in line


# --- wrong models ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bool, torch.int8, torch.int64, torch.complex64])
def test_non_float_weights_are_refused_by_name(capsys, tmp_path, state, dtype):
    state["transformer.layers.1.3.net.2.weight"] = state["transformer.layers.1.3.net.2.weight"].to(dtype)
    line = _compile_error(capsys, tmp_path, _save(tmp_path, state))
    assert f"weight 'transformer.layers.1.3.net.2.weight' is {dtype}" in line
    assert "float16, bfloat16, float32 and float64" in line


@pytest.mark.parametrize("key, rows, needle", [
    ("classifier.1.weight", 0, "(0 classes)"),
    ("transformer.layers.0.3.net.0.weight", 0, "(0 MLP width)"),
], ids=["classes", "mlp"])
def test_degenerate_configurations_are_refused(capsys, tmp_path, state, key, rows, needle):
    state[key] = torch.zeros(rows, state[key].shape[1])
    line = _compile_error(capsys, tmp_path, _save(tmp_path, state))
    assert f"degenerate BitMedViT configuration {needle}: every size must be at least 1 for the model to have logits" in line


def test_a_config_whose_heads_do_not_divide_dim_is_refused():
    from bmvcc.errors import BmvccError

    with pytest.raises(BmvccError, match="5 heads must divide dim 32"):
        small_config(heads=5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_float_dtypes_load_as_their_float32_values(tmp_path, dtype):
    # The PyTorch model bmvcc builds holds exactly the checkpoint's values, widened to float32.
    path = _save(tmp_path, {k: v.to(dtype) for k, v in make_model(CFG).state_dict().items()})
    got = load_source(path).module.state_dict()
    for key, ref in _rounded_model(dtype).state_dict().items():
        assert got[key].dtype == torch.float32 and torch.equal(got[key], ref), key


def test_a_bfloat16_checkpoint_compiles_and_agrees_with_pytorch(artifact):
    from bmvcc.runtime import load

    outdir, model = artifact
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    # As in test_runtime: a wrong weight gives O(1) errors; int8 activation rounding flips ~1e-2.
    np.testing.assert_allclose(load(outdir)(x), ref, atol=5e-2, rtol=0)


# --- pickles ---------------------------------------------------------------------------------------

MARKER = "bmvcc-pwned"


class Payload:
    """Unpickling this runs `touch MARKER` in the working directory: it must never happen."""

    def __reduce__(self):
        return os.system, (f"touch {MARKER}",)


def _torch_zip_with_data_pkl(path, data_pkl: bytes):
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer)
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, data_pkl if info.filename.endswith("/data.pkl") else src.read(info))
    return path


@pytest.mark.parametrize("variant, global_name", [
    ("zip-data-pkl-reduce", "posix.system"),
    ("legacy-torch-save", "posix.system"),
    ("plain-pickle", "posix.system"),
    ("zip-custom-class", "test_hostile_inputs.Custom"),
])
def test_malicious_pickles_need_trust_pickle_and_never_run(capsys, tmp_path, monkeypatch, state, variant, global_name):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    if variant == "zip-data-pkl-reduce":
        _torch_zip_with_data_pkl(path, pickle.dumps(Payload(), protocol=2))
    elif variant == "legacy-torch-save":
        torch.save({"weights": state, "hook": Payload()}, path, _use_new_zipfile_serialization=False)
    elif variant == "plain-pickle":
        path.write_bytes(pickle.dumps({"weights": {}, "hook": Payload()}))
    else:
        torch.save({"weights": state, "info": Custom()}, path)
    line = _compile_error(capsys, tmp_path, path)
    assert f"needs code execution to load: its pickled code references {global_name}" in line
    assert "--trust-pickle, only for files you trust" in line
    assert not (tmp_path / MARKER).exists()


class Custom:
    def __init__(self):
        self.note = "training run 7"


def test_a_truncated_legacy_checkpoint_is_still_corrupt(capsys, tmp_path, state):
    path = _save(tmp_path, state, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert "truncated or corrupt" in _compile_error(capsys, tmp_path, path)


def test_a_zip_declaring_more_than_memory_is_refused_before_unpacking(capsys, tmp_path, state):
    # Deflated records inflate to the size the zip directory declares (about 1000x for zeros); this
    # one declares 100 TB for a 3 kB record, as a deflate bomb would.
    path = _save(tmp_path, state)
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp_path / "bomb.pth", "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        record = next(info for info in dst.filelist if "/data/" in info.filename)
        record.file_size = 10**14  # the central directory is written from filelist on close
    line = _compile_error(capsys, tmp_path, tmp_path / "bomb.pth")
    assert "bomb.pth' unpacks to 100 TB of tensor data, this machine has" in line
