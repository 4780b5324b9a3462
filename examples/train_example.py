"""Train the bundled example: a small BitMedViT on scikit-learn's digits, with BitLinear QAT.

    python examples/train_example.py            # 1-2 minutes on 2 idle CPU cores; test accuracy 0.958

Digits (1797 images, 8x8, 10 classes, pixels 0..16) are scaled to [0, 1], upscaled to 28x28
(bilinear) and normalized with mean 0.5, std 0.5 as MedMNIST's reference preprocessing does. The
model trains in train() mode, where every BitLinear quantizer passes gradients straight through;
the reported accuracy is that of the eval-mode model, whose ternary weights and int8 activations
are exactly what bmvcc compiles. Writes, next to this script:

    bitmedvit_digits.pth        the state dict (what `bmvcc compile` takes)
    digits_test.npy             the first 16 test images, float32 [16, 1, 28, 28] (NCHW)
    digits_test_labels.npy      their labels, int64 [16]
    digits_holdout.npz          all 450 test images as scikit-learn ships them (accuracy.py)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.nn import functional as F

from accuracy import to_model_input
from bmvcc.model import BitMedViT, ViTConfig

HERE = Path(__file__).resolve().parent
SEED = 0
CONFIG = ViTConfig(image_size=28, patch_size=7, channels=1, num_classes=10, dim=64, depth=2, heads=4,
                   mlp_dim=128, multi_query=True, fp_attn=False)


def split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and the held-out digits: stratified 75/25, fixed seed."""
    return train_test_split(np.arange(len(labels)), test_size=0.25, random_state=SEED, stratify=labels)


def accuracy(model: BitMedViT, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()

    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    data = load_digits()
    x, y = to_model_input(data.images), data.target.astype(np.int64)
    train, test = split(y)
    x_tr, y_tr, x_te, y_te = map(torch.from_numpy, (x[train], y[train], x[test], y[test]))

    model = BitMedViT(CONFIG)
    steps_per_epoch = (len(x_tr) + 63) // 64
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.epochs * steps_per_epoch)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()  # BitLinear quantizers: straight-through estimators
        perm = torch.randperm(len(x_tr))
        total = 0.0
        for i in range(0, len(x_tr), 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if epoch % 5 == 4 or epoch == args.epochs - 1:
            print(f"epoch {epoch + 1:3d}  loss {total / len(x_tr):.4f}  "
                  f"test acc (quantized) {accuracy(model, x_te, y_te):.4f}  {time.perf_counter() - start:.0f} s")

    acc = accuracy(model, x_te, y_te)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.out / "bitmedvit_digits.pth"
    torch.save(model.state_dict(), ckpt)
    np.save(args.out / "digits_test.npy", x_te[:16].numpy().astype(np.float32))
    np.save(args.out / "digits_test_labels.npy", y_te[:16].numpy())
    np.savez_compressed(args.out / "digits_holdout.npz", images=data.images[test].astype(np.uint8),
                        labels=y[test].astype(np.uint8))
    print(f"test accuracy of the eval-mode (ternary weights, int8 activations) model: {acc:.4f} "
          f"on {len(x_te)} images")
    print(f"saved {ckpt} ({ckpt.stat().st_size / 1024:.0f} KiB), digits_test.npy, digits_test_labels.npy, "
          "digits_holdout.npz")


if __name__ == "__main__":
    main()
