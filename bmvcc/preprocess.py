"""uint8 images -> the model's float32 NCHW input, as recorded in metadata["preprocessing"].

The reference (MedMNIST training of BitMedViT) feeds `(pixel / 255 - 0.5) / 0.5` in NCHW. Images
whose size differs from the model's are resized first, on the uint8 image, with PIL bilinear
(torchvision's Resize on PIL images). numpy and Pillow only: usable on the device.
"""

from __future__ import annotations

import numpy as np

from .errors import BmvccError

# What `bmvcc compile` records: x = (pixel / pixel_max - mean) / std, per channel.
REFERENCE = {"pixel_max": 255.0, "mean": 0.5, "std": 0.5, "resize": "bilinear"}


def to_input(images: np.ndarray, metadata: dict) -> np.ndarray:
    """uint8 images [N, H, W] (1 channel) or [N, H, W, C] -> float32 [N, C, S, S] for the model."""
    _, channels, height, width = metadata["input"]["shape"]
    prep = metadata.get("preprocessing", REFERENCE)
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise BmvccError(f"images are {images.dtype}, expected uint8 pixels (0-255); pass raw images, not tensors")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] != channels:
        raise BmvccError(f"images of shape {images.shape} do not have the model's {channels} channel(s); "
                         f"convert them to {'grayscale' if channels == 1 else 'RGB'}")
    if images.shape[1:3] != (height, width):
        images = np.stack([_resize(im, (width, height)) for im in images])
    x = images.astype(np.float32) / np.float32(prep["pixel_max"])
    x = (x - np.float32(prep["mean"])) / np.float32(prep["std"])
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    out = np.asarray(pil.resize(size, Image.BILINEAR))
    return out[..., None] if out.ndim == 2 else out
