"""MedMNIST 2D data sets: names, tasks and label names from medmnist.INFO, and the npz files.

Files are read from a directory the user gives, in medmnist's own layout and never downloaded:
`{flag}.npz` (28x28) or `{flag}_{size}.npz`, with keys `{split}_images` (uint8 [N, H, W] for
1 channel, [N, H, W, 3] for 3) and `{split}_labels` (int [N, L]). Importing the medmnist package
imports torch (seconds): INFO is read from its info.py alone. This module is for the host tools
(compile, eval), not for the device runtime.
"""

from __future__ import annotations

import functools
import importlib.util
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BmvccError

SPLITS = ("train", "val", "test")
SIZES = (28, 64, 128, 224)  # medmnist's MedMNIST2D.available_sizes


@dataclass(frozen=True)
class Dataset:
    name: str  # medmnist flag, e.g. "pathmnist"
    task: str  # "multi-class", "binary-class", "multi-label, binary-class" or "ordinal-regression"
    channels: int
    labels: dict  # {"0": "adipose", ...} as in medmnist.INFO

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict:
        return {"name": self.name, "task": self.task, "channels": self.channels, "labels": self.labels}

    def check_model(self, channels: int, num_classes: int) -> None:
        if channels != self.channels:
            raise BmvccError(f"data set {self.name} has {self.channels}-channel images, the model takes {channels} "
                             f"channel(s); use a {channels}-channel MedMNIST data set or a model trained on {self.name}")
        if num_classes != self.num_classes:
            raise BmvccError(f"data set {self.name} has {self.num_classes} classes, the model outputs {num_classes}; "
                             f"use the data set the model was trained on")


@functools.cache
def _medmnist_info() -> dict:
    """medmnist.INFO from medmnist/info.py (plain data), without the package's __init__, which imports torch."""
    package = Path(importlib.util.find_spec("medmnist").submodule_search_locations[0])
    spec = importlib.util.spec_from_file_location("bmvcc._medmnist_info", package / "info.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.INFO


def dataset(name: str) -> Dataset:
    table = _medmnist_info()
    flags_2d = [flag for flag in table if not flag.endswith("3d")]
    if name not in flags_2d:
        raise BmvccError(f"'{name}' is not a MedMNIST 2D data set; choose one of: {', '.join(flags_2d)}")
    info = table[name]
    return Dataset(name, info["task"], int(info["n_channels"]), dict(info["label"]))


def npz_path(data_dir: Path, name: str, size: int) -> Path:
    return Path(data_dir) / (f"{name}.npz" if size == 28 else f"{name}_{size}.npz")


def load_split(data_dir: Path, ds: Dataset, size: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, H, W(, 3)], labels [N, L]) of one split, checked against the data set's facts."""
    if split not in SPLITS:
        raise BmvccError(f"split '{split}' does not exist; choose one of: {', '.join(SPLITS)}")
    if size not in SIZES:
        raise BmvccError(f"--size {size} is not a MedMNIST size; choose one of: {', '.join(map(str, SIZES))}")
    path = npz_path(data_dir, ds.name, size)
    if not path.is_file():
        raise BmvccError(f"'{path}' does not exist; put MedMNIST's {path.name} in {data_dir} (bmvcc never downloads) "
                         "or pass the --size of a file you have")
    try:
        _check_claims(path, (f"{split}_images", f"{split}_labels"))
        with np.load(path, allow_pickle=False) as npz:
            images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
    except KeyError:
        raise BmvccError(f"'{path}' has no {split}_images/{split}_labels; it is not a MedMNIST npz file") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise BmvccError(f"'{path}' is not a readable npz file ({str(e)[:80]}); download it again") from None
    channels = 1 if images.ndim == 3 else images.shape[-1] if images.ndim == 4 else None
    if channels != ds.channels or images.dtype != np.uint8 or images.shape[1:3] != (size, size):
        raise BmvccError(f"'{path}' holds {images.dtype} images of shape {images.shape[1:]}, MedMNIST {ds.name} at size "
                         f"{size} has uint8 {size}x{size}x{ds.channels}; use the file from MedMNIST")
    if len(images) == 0:
        raise BmvccError(f"'{path}' has no {split} images; evaluate another --split, or download the file again")
    if len(labels) != len(images):
        raise BmvccError(f"'{path}' has {len(images)} {split} images but {len(labels)} labels; download it again")
    return images, labels


def _check_claims(path: Path, names) -> None:
    """Refuses an npz member whose .npy header claims more data than the member holds (before np.load
    allocates what the header claims)."""
    from .resources import human, npy_claim

    with zipfile.ZipFile(path) as z:
        for name in names:
            try:
                info = z.getinfo(f"{name}.npy")
            except KeyError:
                continue  # reported as a missing array by the caller
            with z.open(info) as f:
                shape, dtype, claimed = npy_claim(f)
                held = info.file_size - f.tell()
            if claimed > held and not dtype.hasobject:
                raise BmvccError(f"'{path}' claims {dtype} {shape} ({human(claimed)}) for {name} but holds "
                                 f"{human(held)}; it is truncated or damaged: download it again")

