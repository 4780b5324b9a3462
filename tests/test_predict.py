"""bmvcc predict: top classes of PNG, JPEG and .npy images, with medmnist's label names."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from bmvcc import artifact
from bmvcc.cli import main

from conftest import cli_error, small_config


@pytest.fixture(scope="module")
def organ(tmp_path_factory, checkpoint):
    """A 1-channel 11-class model compiled through the CLI with --dataset organamnist."""
    path, model = checkpoint(small_config(num_classes=11), seed=5)
    out = tmp_path_factory.mktemp("predict") / "organ"
    main(["compile", str(path), "-o", str(out), "--dataset", "organamnist"])
    return out, model


def blob(size: int = 28) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    return (40 + 200 * np.exp(-((yy - 0.3) ** 2 + (xx - 0.6) ** 2) * 20)).astype(np.uint8)


def torch_probabilities(model, pixels: np.ndarray) -> np.ndarray:
    """Softmax of the PyTorch model on (pixels / 255 - 0.5) / 0.5, the reference normalization."""
    x = ((pixels.astype(np.float32) / 255 - 0.5) / 0.5)[None, None]
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(x)).double(), dim=1)[0].numpy()


def test_predict_png_with_label_names(organ, tmp_path, capsys):
    from medmnist import INFO

    out, model = organ
    pixels = blob()
    Image.fromarray(pixels).save(tmp_path / "scan.png")
    main(["predict", str(out), str(tmp_path / "scan.png"), "--top", "3", "--json"])
    (result,) = json.loads(capsys.readouterr().out)
    ref = torch_probabilities(model, pixels)
    top = result["top"]
    assert [t["class"] for t in top] == list(np.argsort(-ref)[:3])
    assert [t["label"] for t in top] == [INFO["organamnist"]["label"][str(t["class"])] for t in top]
    # Logits agree to ~1e-3 (int8 activation rounding), so probabilities to well under 1e-2.
    np.testing.assert_allclose([t["probability"] for t in top], ref[np.argsort(-ref)[:3]], atol=1e-2)

    main(["predict", str(out), str(tmp_path / "scan.png")])
    text = capsys.readouterr().out
    assert str(tmp_path / "scan.png") in text and top[0]["label"] in text


def test_predict_jpeg_and_npy_match_png(organ, tmp_path, capsys):
    out, _ = organ
    pixels = blob()
    Image.fromarray(pixels).save(tmp_path / "a.png")
    np.save(tmp_path / "raw.npy", pixels)
    Image.fromarray(np.stack([pixels] * 3, axis=-1)).save(tmp_path / "rgb.jpg", quality=100)  # RGB -> grayscale
    main(["predict", str(out), str(tmp_path / "a.png"), str(tmp_path / "raw.npy"), str(tmp_path / "rgb.jpg"), "--json"])
    png, raw, jpg = json.loads(capsys.readouterr().out)
    assert png["top"] == raw["top"]
    assert jpg["top"][0]["class"] == png["top"][0]["class"]  # JPEG is lossy: the same winner, not the same bits


def test_predict_resizes_and_takes_preprocessed_float_npy(organ, tmp_path, capsys):
    out, model = organ
    Image.fromarray(blob(56)).save(tmp_path / "big.png")  # 56x56 -> resized to 28x28 (bilinear)
    x = ((blob().astype(np.float32) / 255 - 0.5) / 0.5)[None]
    np.save(tmp_path / "input.npy", x)
    main(["predict", str(out), str(tmp_path / "big.png"), str(tmp_path / "input.npy"), "--json", "--top", "11"])
    big, pre = json.loads(capsys.readouterr().out)
    assert len(big["top"]) == 11 and sum(t["probability"] for t in big["top"]) == pytest.approx(1.0, abs=1e-9)
    ref = torch_probabilities(model, blob())
    assert pre["top"][0]["class"] == int(ref.argmax())


def test_predict_takes_a_batch_npy_as_n_images(organ, tmp_path, capsys):
    out, model = organ
    pixels = [blob(), blob().T.copy(), blob()[::-1].copy()]
    np.save(tmp_path / "batch.npy", np.stack([((p.astype(np.float32) / 255 - 0.5) / 0.5)[None] for p in pixels]))
    main(["predict", str(out), str(tmp_path / "batch.npy"), "--json"])
    results = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in results] == [f"{tmp_path / 'batch.npy'}[{i}]" for i in range(3)]
    for r, p in zip(results, pixels):
        ref = torch_probabilities(model, p)
        assert r["top"][0]["class"] == int(ref.argmax())
        np.testing.assert_allclose(r["top"][0]["probability"], ref.max(), atol=1e-2)  # as in the PNG test


def test_predict_without_a_recorded_data_set_uses_indices(organ, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(organ[0], bare)
    meta = artifact.read_metadata(bare)
    meta["dataset"] = None
    artifact.write_metadata(bare, meta)
    Image.fromarray(blob()).save(tmp_path / "a.png")
    main(["predict", str(bare), str(tmp_path / "a.png"), "--json"])
    (result,) = json.loads(capsys.readouterr().out)
    assert all(t["label"] is None for t in result["top"])
    main(["predict", str(bare), str(tmp_path / "a.png")])
    assert "class " in capsys.readouterr().out


@pytest.mark.parametrize("name, content, message", [
    ("missing.png", None, "does not exist"),
    ("notes.txt", b"hello", "not a PNG, JPEG or .npy file"),
    ("broken.png", b"not a png", "not a readable image"),
    ("wrong.npy", np.zeros((2, 2, 2, 2), np.float64), "a .npy image must be uint8"),
])
def test_predict_user_errors(organ, tmp_path, capsys, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        np.save(path, content)
    assert message in cli_error(capsys, ["predict", str(organ[0]), str(path)])
