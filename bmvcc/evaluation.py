"""bmvcc eval: ACC and AUC of an artifact on a MedMNIST split (medmnist.Evaluator), optionally
side by side with the PyTorch reference model run on the very same preprocessed images."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from . import artifact, data, preprocess
from .errors import BmvccError
from .sources import check_source

CHUNK = 64  # images preprocessed and run per step (bounds memory at 224x224; one progress step)


def scores(logits: np.ndarray, task: str) -> np.ndarray:
    """Per-class scores medmnist's metrics expect: sigmoid for multi-label tasks, softmax otherwise."""
    logits = logits.astype(np.float64)
    if task == "multi-label, binary-class":
        return 1.0 / (1.0 + np.exp(-logits))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def predictions(score: np.ndarray, task: str) -> np.ndarray:
    """The decision per image: the label set above 0.5 for multi-label tasks, else the arg-max class."""
    return score > 0.5 if task == "multi-label, binary-class" else score.argmax(axis=1)[:, None]


def default_size(image_size: int) -> int:
    """The MedMNIST file to read when --size is not given: the model's size if MedMNIST has it, else 28."""
    return image_size if image_size in data.SIZES else 28


def evaluate(outdir: Path, dataset_name: str, data_dir: Path, split: str = "test", size: int | None = None,
             ckpt: Path | None = None, progress=None) -> dict:
    """`progress(length=, label=)`: a context manager with .update(n) (typer.progressbar), or None."""
    from .runtime import load

    meta = artifact.read_metadata(outdir)
    if ckpt is not None:  # before the seconds of reading the data and importing torch
        if Path(ckpt).suffix == ".onnx":
            raise BmvccError(f"--ckpt '{ckpt}' is an ONNX model; pass the PyTorch checkpoint (.pth or .pt2) to compare with")
        check_source(ckpt)
    _, channels, image_size, _ = meta["input"]["shape"]
    recorded = (meta.get("dataset") or {}).get("name")
    if recorded and recorded != dataset_name:
        raise BmvccError(f"'{outdir}' was compiled for data set {recorded}, not {dataset_name}; pass --dataset {recorded}")
    ds = data.dataset(dataset_name)
    ds.check_model(channels, meta["num_classes"])
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise BmvccError(f"--data-dir '{data_dir}' is not a directory; pass the folder holding the MedMNIST npz files")
    size = default_size(image_size) if size is None else size
    images, labels = data.load_split(data_dir, ds, size, split)
    from medmnist import Evaluator  # imports torch: after the checks

    model = load(outdir)
    reference = _reference(ckpt, meta) if ckpt is not None else None

    logits, ref_logits = [], []
    with (progress or _no_progress)(length=len(images), label=f"{ds.name} {split}") as bar:
        for start in range(0, len(images), CHUNK):
            x = preprocess.to_input(images[start : start + CHUNK], meta)
            logits.append(model(x))
            if reference is not None:
                ref_logits.append(reference(x))
            bar.update(len(x))
    logits = np.concatenate(logits)

    evaluator = Evaluator(ds.name, split, size=size, root=str(data_dir))
    score = scores(logits, ds.task)
    auc, acc = evaluator.evaluate(score)
    result = {"artifact": str(outdir), "dataset": ds.name, "split": split, "size": size, "images": len(images),
              "resized_to": image_size if image_size != size else None, "acc": float(acc), "auc": float(auc)}
    if reference is not None:
        ref_logits = np.concatenate(ref_logits)
        ref_score = scores(ref_logits, ds.task)
        ref_auc, ref_acc = evaluator.evaluate(ref_score)
        same = (predictions(score, ds.task) == predictions(ref_score, ds.task)).all(axis=1)
        result["reference"] = {"checkpoint": str(ckpt), "acc": float(ref_acc), "auc": float(ref_auc),
                               "agreement": float(same.mean()),
                               "max_abs_logit_diff": float(np.abs(logits - ref_logits).max())}
    return result


def _reference(ckpt: Path, meta: dict):
    """The PyTorch model of `ckpt` as a numpy -> numpy function (the compiler's own frontend loads it)."""
    from .frontend import load_source, torch_logits

    config = meta.get("config") or {}
    source = load_source(Path(ckpt), heads=config.get("heads"), image_size=config.get("image_size"))
    if list(source.input_shape) != meta["input"]["shape"][1:] or source.num_classes != meta["num_classes"]:
        raise BmvccError(f"--ckpt '{ckpt}' takes {source.input_shape} images and has {source.num_classes} classes, the "
                         f"artifact {tuple(meta['input']['shape'][1:])} and {meta['num_classes']}; pass the checkpoint it was compiled from")
    return torch_logits(source)


@contextlib.contextmanager
def _no_progress(length: int, label: str):
    class _Bar:
        def update(self, n: int) -> None:
            pass

    yield _Bar()
