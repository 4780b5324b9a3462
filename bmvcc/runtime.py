"""Load and run a compiled artifact with the TVM runtime and numpy only (what a device runs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import artifact
from .errors import BmvccError


class CompiledModel:
    """Callable: float32 images [B', C, H, W] (any B') -> logits [B', classes], in chunks of the batch."""

    def __init__(self, outdir: Path, device: str = "cpu"):
        import tvm
        from tvm import relax

        self.outdir = Path(outdir)
        self.metadata = artifact.read_metadata(self.outdir)
        self.input_shape = tuple(self.metadata["input"]["shape"])
        self.dev = tvm.cpu() if device == "cpu" else tvm.device(device)
        lib = tvm.runtime.load_module(str(self.outdir / artifact.MODULE))
        self.vm = relax.VirtualMachine(lib, self.dev)
        params = tvm.runtime.load_param_dict_from_file(str(self.outdir / artifact.WEIGHTS))
        self.weights = [params[f"w{i}"].copyto(self.dev) for i in range(self.metadata["num_weights"])]
        self._tensor = lambda a: tvm.runtime.tensor(a, self.dev)

    @property
    def batch(self) -> int:
        return self.input_shape[0]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = self.validate(images)
        out = []
        for start in range(0, len(images), self.batch):
            chunk = images[start : start + self.batch]
            n = len(chunk)
            if n < self.batch:
                chunk = np.concatenate([chunk, np.zeros((self.batch - n, *chunk.shape[1:]), np.float32)])
            res = self.vm["main"](self._tensor(np.ascontiguousarray(chunk)), *self.weights)
            res = res[0] if not hasattr(res, "numpy") else res
            out.append(res.numpy()[:n])
        return np.concatenate(out)

    def validate(self, images) -> np.ndarray:
        if not isinstance(images, np.ndarray):
            raise BmvccError(f"input is a {type(images).__name__}, not a numpy array; pass float32 NCHW images")
        per_image = self.input_shape[1:]
        if images.ndim == len(per_image):
            images = images[None]
        if images.shape[1:] != per_image:
            raise BmvccError(
                f"input has shape {images.shape}, the model takes (N, {', '.join(map(str, per_image))}) float32 images; "
                "resize or reorder to NCHW"
            )
        if images.dtype != np.float32:
            raise BmvccError(f"input dtype is {images.dtype}, the model takes float32; convert with .astype(np.float32)")
        return images


def load(outdir, device: str = "cpu") -> CompiledModel:
    return CompiledModel(Path(outdir), device)


def load_npy(path: Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise BmvccError(f"input '{path}' does not exist; check the path")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise BmvccError(f"input '{path}' is not a .npy array ({str(e)[:80]}); save images with numpy.save") from None
