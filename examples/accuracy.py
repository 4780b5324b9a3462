"""Accuracy of a compiled example on the 450 held-out digits: the README's figure, checked.

    python examples/accuracy.py OUTDIR       # OUTDIR from bmvcc compile examples/bitmedvit_digits.pth

digits_holdout.npz holds the test split of examples/train_example.py (scikit-learn's digits, stratified
75/25, seed 0) as shipped by scikit-learn: `images` uint8 [450, 8, 8] (pixels 0..16) and `labels` uint8
[450]. They are upscaled and normalized here exactly as for training (to_model_input).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

HOLDOUT = Path(__file__).resolve().parent / "digits_holdout.npz"


def to_model_input(images: np.ndarray) -> np.ndarray:
    """Digits' 8x8 images (pixels 0..16) -> float32 [N, 1, 28, 28]: scaled to [0, 1], upscaled (bilinear)
    and normalized with mean 0.5, std 0.5 as MedMNIST's reference preprocessing does."""
    import torch
    from torch.nn import functional as F

    x = torch.from_numpy(np.asarray(images, np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)
    return ((x - 0.5) / 0.5).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path, help="artifact directory of the compiled example")
    args = parser.parse_args()
    import bmvcc

    holdout = np.load(HOLDOUT)
    predicted = bmvcc.load(args.outdir)(to_model_input(holdout["images"])).argmax(1)
    correct = int((predicted == holdout["labels"]).sum())
    print(f"accuracy {correct / len(predicted):.3f} ({correct} of {len(predicted)} held-out digits)")


if __name__ == "__main__":
    main()
