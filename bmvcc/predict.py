"""bmvcc predict: the top classes of image files (PNG, JPEG, or .npy) with probabilities.

PNG/JPEG files and uint8 .npy arrays ([H, W] or [H, W, C]) are raw pixels: converted to the model's
channels (grayscale or RGB), resized and normalized as metadata["preprocessing"] says. A float32 .npy
of shape [C, H, W], or [N, C, H, W] for N images, is taken as already preprocessed model input. Class names come from the
MedMNIST data set recorded at compile time (--dataset); without one, classes are indices.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from . import preprocess
from .errors import BmvccError
from .evaluation import scores

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def read_image(path: Path, meta: dict) -> np.ndarray:
    """One file -> float32 [N, C, H, W] model input: one image, or a batch .npy's N."""
    path = Path(path)
    if not path.is_file():
        raise BmvccError(f"image '{path}' does not exist; check the path")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        from .runtime import load_npy

        array = load_npy(path)
        chw = tuple(meta["input"]["shape"][1:])
        if array.dtype == np.float32 and array.shape[-3:] == chw and array.ndim in (3, 4) and array.size:
            return array.reshape(-1, *chw)
        if array.dtype != np.uint8 or array.ndim not in (2, 3):
            raise BmvccError(f"'{path}' holds {array.dtype} {array.shape}; a .npy image must be uint8 [H, W] or [H, W, C], "
                             f"or float32 {list(chw)} or [N, {', '.join(map(str, chw))}] already preprocessed")
        return preprocess.to_input(array[None], meta)
    if suffix not in IMAGE_SUFFIXES:
        raise BmvccError(f"'{path}' is not a PNG, JPEG or .npy file; convert it to one of those")
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # PIL warns above MAX_IMAGE_PIXELS and refuses above twice that
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                pixels = np.asarray(im.convert("L" if meta["input"]["shape"][1] == 1 else "RGB"))
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        size = meta["input"]["shape"][2]
        raise BmvccError(f"'{path}' has more than {Image.MAX_IMAGE_PIXELS:,} pixels (PIL's limit against "
                         f"decompression bombs); downscale it, the model takes {size}x{size}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise BmvccError(f"'{path}' is not a readable image ({str(e)[:80]}); check the file") from None
    return preprocess.to_input(pixels[None], meta)


def predict(outdir: Path, images: list[Path], top: int = 3) -> list[dict]:
    """[{"image": path, "top": [{"class": i, "label": name or None, "probability": p}, ...]}, ...]."""
    from .artifact import read_metadata
    from .runtime import load

    if not images:
        raise BmvccError("no images given; pass one or more PNG, JPEG or .npy files")
    meta = read_metadata(outdir)
    if top < 1:
        raise BmvccError(f"--top {top} must be at least 1")
    batches = [read_image(p, meta) for p in images]  # every file checked before loading the runtime (seconds)
    model = load(outdir)
    names = [f"{p}[{i}]" if len(b) > 1 else str(p) for p, b in zip(images, batches) for i in range(len(b))]
    x = np.concatenate(batches)
    dataset = meta.get("dataset") or {}
    task = dataset.get("task", "multi-class")
    labels = dataset.get("labels", {})
    prob = scores(model(x), task)
    results = []
    for name, p in zip(names, prob):
        order = np.argsort(-p, kind="stable")[:top]
        results.append({"image": name,
                        "top": [{"class": int(c), "label": labels.get(str(c)), "probability": float(p[c])} for c in order]})
    return results


def format_text(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines.append(r["image"])
        for t in r["top"]:
            name = t["label"] if t["label"] is not None else f"class {t['class']}"
            lines.append(f"  {t['probability']:7.2%}  {t['class']:>3}  {name}")
    return "\n".join(lines)
