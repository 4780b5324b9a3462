"""bmvcc eval on small npz files in MedMNIST's own format: a 1-channel and a 3-channel data set."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bmvcc import preprocess
from bmvcc.cli import main
from bmvcc.driver import CompileOptions, compile_model
from bmvcc.evaluation import evaluate

from conftest import cli_error, small_config

# medmnist flags with their real channels and classes (medmnist.INFO): the models must match them.
ORGAN = ("organamnist", 1, 11)
BLOOD = ("bloodmnist", 3, 8)


def write_medmnist(root, flag: str, channels: int, classes: int, size: int = 28, n_test: int = 48, seed: int = 0):
    """`{flag}.npz` / `{flag}_{size}.npz` with medmnist's keys: uint8 images, [N, 1] integer labels.

    Images are blobs of random place, width and tint on a random background, plus noise (not flat
    noise), so that the tiny models predict several different classes.
    """
    rng = np.random.default_rng(seed)
    yy, xx = (g[None, ..., None] for g in np.mgrid[0:size, 0:size] / size)
    arrays = {}
    for split, n in (("train", 4), ("val", 4), ("test", n_test)):
        cy, cx = rng.uniform(0.1, 0.9, (2, n, 1, 1, channels))
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) * rng.uniform(5, 60, (n, 1, 1, channels)))
        img = (rng.uniform(0, 120, (n, 1, 1, channels)) + 255 * blob * rng.uniform(0.2, 1.0, (n, 1, 1, channels))
               + rng.normal(0, 20, (n, size, size, channels)))
        img = np.clip(img, 0, 255).astype(np.uint8)
        arrays[f"{split}_images"] = img[..., 0] if channels == 1 else img
        arrays[f"{split}_labels"] = rng.permutation(np.arange(n) % classes)[:, None].astype(np.uint8)  # every class: AUC defined
    name = f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"
    np.savez(root / name, **arrays)
    return arrays


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("medmnist")
    write_medmnist(root, *ORGAN)
    write_medmnist(root, *ORGAN, size=64, n_test=16, seed=1)
    write_medmnist(root, *BLOOD, seed=2)
    return root


@pytest.fixture(scope="module")
def organ(tmp_path_factory, checkpoint):
    """1-channel, 11 classes, compiled with --dataset organamnist and batch 4 (48 images: 12 calls)."""
    path, model = checkpoint(small_config(num_classes=11), seed=3)
    out = tmp_path_factory.mktemp("eval") / "organ"
    compile_model(path, out, CompileOptions(batch=4, dataset="organamnist"))
    return out, path, model


@pytest.fixture(scope="module")
def blood(tmp_path_factory, checkpoint):
    """3-channel, 8 classes, no data set recorded."""
    path, model = checkpoint(small_config(channels=3, num_classes=8), seed=4)
    out = tmp_path_factory.mktemp("eval") / "blood"
    compile_model(path, out, CompileOptions())
    return out, path, model


def torch_accuracy(model, images: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """ACC of the PyTorch model computed here, without medmnist: the normalization written out."""
    x = images.astype(np.float32) / 255
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    with torch.no_grad():
        logits = model(torch.from_numpy((x - 0.5) / 0.5)).numpy()
    pred = logits.argmax(axis=1)
    return float((pred == labels[:, 0]).mean()), pred


def test_eval_1ch_agrees_with_pytorch_cli(organ, data_dir, capsys):
    out, ckpt, model = organ
    main(["eval", str(out), "--dataset", "organamnist", "--data-dir", str(data_dir), "--ckpt", str(ckpt), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 48 and result["size"] == 28 and result["resized_to"] is None
    # The acceptance criterion: the host build predicts exactly what the PyTorch reference predicts.
    assert result["reference"]["agreement"] == 1.0
    npz = np.load(data_dir / "organamnist.npz")
    acc, pred = torch_accuracy(model, npz["test_images"], npz["test_labels"])
    assert len(set(pred)) > 2  # the data set is not degenerate: the check can fail
    assert result["acc"] == pytest.approx(acc, abs=1e-12) and result["reference"]["acc"] == pytest.approx(acc, abs=1e-12)
    assert result["auc"] == pytest.approx(result["reference"]["auc"], abs=1e-3)  # same ranking up to ~1e-3 logit noise
    assert 0.0 <= result["auc"] <= 1.0


def test_eval_3ch_agrees_with_pytorch(blood, data_dir):
    out, ckpt, model = blood
    result = evaluate(out, "bloodmnist", data_dir, ckpt=ckpt)
    assert result["reference"]["agreement"] == 1.0
    npz = np.load(data_dir / "bloodmnist.npz")
    acc, pred = torch_accuracy(model, npz["test_images"], npz["test_labels"])
    assert len(set(pred)) > 2
    assert result["acc"] == pytest.approx(acc, abs=1e-12)


def test_eval_ckpt_a_static_batch_pt2(blood, data_dir, tmp_path):
    """--ckpt a .pt2 exported for batch 1 (torch.export's default): the reference runs it an image at a time
    (eval feeds up to 64 at once), which is the model the artifact was compiled from."""
    out, _, model = blood
    torch.export.save(torch.export.export(model, (torch.zeros(1, 3, 28, 28),)), tmp_path / "blood.pt2")
    reference = evaluate(out, "bloodmnist", data_dir, ckpt=tmp_path / "blood.pt2")["reference"]
    npz = np.load(data_dir / "bloodmnist.npz")
    assert reference["agreement"] == 1.0
    acc, _ = torch_accuracy(model, npz["test_images"], npz["test_labels"])
    assert reference["acc"] == pytest.approx(acc, abs=1e-12)


def test_eval_resizes_when_the_file_size_differs(organ, data_dir):
    out, ckpt, _ = organ
    steps = []

    class Bar:
        def __init__(self, length, label):
            steps.append(("start", length))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            steps.append(("update", n))

    result = evaluate(out, "organamnist", data_dir, split="test", size=64, ckpt=ckpt, progress=Bar)
    assert result["size"] == 64 and result["resized_to"] == 28 and result["images"] == 16
    assert result["reference"]["agreement"] == 1.0
    assert steps == [("start", 16), ("update", 16)]


def test_preprocessing_matches_the_reference_normalization():
    meta = {"input": {"shape": [1, 3, 2, 2]}, "preprocessing": preprocess.REFERENCE}
    img = np.zeros((1, 2, 2, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 0, 255, 51
    x = preprocess.to_input(img, meta)
    assert x.shape == (1, 3, 2, 2) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, :, 0, 0], [-1.0, 1.0, 51 / 255 * 2 - 1], atol=1e-6)  # float32 rounding
    # Resizing a constant image keeps it constant (bilinear), and gives the model's size.
    big = np.full((2, 8, 8), 128, np.uint8)
    y = preprocess.to_input(big, {"input": {"shape": [1, 1, 4, 4]}})
    assert y.shape == (2, 1, 4, 4)
    np.testing.assert_allclose(y, 128 / 255 * 2 - 1, atol=1e-6)


@pytest.mark.parametrize("args, message", [
    (["--dataset", "organamnist"], "has 1-channel images, the model takes 3"),
    (["--dataset", "pathmnist"], "has 9 classes, the model outputs 8"),
    (["--dataset", "organmnist3d"], "not a MedMNIST 2D data set"),
    (["--dataset", "bloodmnist", "--size", "64"], "bloodmnist_64.npz' does not exist"),
    (["--dataset", "bloodmnist", "--size", "30"], "not a MedMNIST size"),
    (["--dataset", "bloodmnist", "--split", "dev"], "split 'dev' does not exist"),
])
def test_eval_user_errors(blood, data_dir, capsys, args, message):
    line = cli_error(capsys, ["eval", str(blood[0]), "--data-dir", str(data_dir), *args])
    assert message in line


def test_eval_refuses_another_data_set_than_compiled(organ, data_dir, capsys):
    line = cli_error(capsys, ["eval", str(organ[0]), "--dataset", "organcmnist", "--data-dir", str(data_dir)])
    assert "compiled for data set organamnist" in line


def test_eval_rejects_a_malformed_npz(blood, tmp_path, capsys):
    np.savez(tmp_path / "bloodmnist.npz", test_images=np.zeros((2, 28, 28), np.uint8), test_labels=np.zeros((2, 1)))
    line = cli_error(capsys, ["eval", str(blood[0]), "--dataset", "bloodmnist", "--data-dir", str(tmp_path)])
    assert "MedMNIST bloodmnist at size 28 has uint8 28x28x3" in line


def test_compile_rejects_a_data_set_that_does_not_fit(checkpoint, tmp_path, capsys):
    path, _ = checkpoint(small_config(num_classes=11), seed=3)
    line = cli_error(capsys, ["compile", str(path), "-o", str(tmp_path / "o"), "--dataset", "bloodmnist"])
    assert "has 3-channel images, the model takes 1" in line
    assert not (tmp_path / "o").exists()
