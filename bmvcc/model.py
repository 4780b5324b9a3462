"""BitMedViT in plain PyTorch, with the deployment semantics of docs/bitmedvit.md.

Module and parameter names mirror the authors' OneBitViT so that its state dicts load unchanged.
In eval mode every quantizer computes its integer codes exactly; in training mode the same math
passes gradients straight through (QAT), which examples/train_example.py uses.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .errors import BmvccError

NORM_EPS = 1e-5  # RMSNorm eps inside BitLinear
SCALE_EPS = 1e-5  # lower clamp of both quantization scales' denominators


@dataclass(frozen=True)
class ViTConfig:
    image_size: int
    patch_size: int
    channels: int
    num_classes: int
    dim: int
    depth: int
    heads: int
    mlp_dim: int
    multi_query: bool
    fp_attn: bool
    matcher_dim: int = 0  # rows of the training-only matcher head; 0 = absent

    def __post_init__(self):
        """Refuses what no BitMedViT can be: an empty dimension (0 classes make a head without logits,
        0 MLP or dim features an RMSNorm over nothing, NaN) or heads / patches that do not tile."""
        sizes = {"classes": self.num_classes, "dim": self.dim, "depth": self.depth, "heads": self.heads,
                 "MLP width": self.mlp_dim, "patch size": self.patch_size, "image size": self.image_size,
                 "channels": self.channels}
        empty = [f"{value} {name}" for name, value in sizes.items() if value < 1]
        if empty:
            raise BmvccError(f"degenerate BitMedViT configuration ({', '.join(empty)}): every size must be at least 1 "
                             "for the model to have logits and finite values; the checkpoint is not a trained model")
        if self.dim % self.heads or self.image_size % self.patch_size:
            raise BmvccError(f"degenerate BitMedViT configuration: {self.heads} heads must divide dim {self.dim} and "
                             f"patch size {self.patch_size} the image size {self.image_size}; the checkpoint is not a trained model")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid**2

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.channels

    def to_dict(self) -> dict:
        return asdict(self)


def _ste(x: torch.Tensor, quantized: torch.Tensor, training: bool) -> torch.Tensor:
    """Straight-through estimator while training; the quantized value itself in eval."""
    return x + (quantized - x).detach() if training else quantized


class BitLinear(nn.Linear):
    """RMSNorm -> int8 absmax per-token activations x ternary absmean weights.

    y = (q @ T^T) / s_w / s_x, with q = clamp(round(xn * s_x), -128, 127), s_x = 127 / max|xn|,
    T = clamp(round(W * s_w), -1, 1), s_w = 1 / mean|W| (one scalar per tensor). The bias exists in
    the state dict but is never applied, as in the reference.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=True)
        self.norm = RMSNorm(in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xn = self.norm(x)
        s_x = 127.0 / xn.abs().max(dim=-1, keepdim=True).values.clamp(min=SCALE_EPS)
        xq = _ste(xn, (xn * s_x).round().clamp(-128, 127) / s_x, self.training)
        w = self.weight
        s_w = 1.0 / w.abs().mean().clamp(min=SCALE_EPS)
        wq = _ste(w, (w * s_w).round().clamp(-1, 1) / s_w, self.training)
        return F.linear(xq, wq)


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + NORM_EPS) * self.weight


def _projection(cfg: ViTConfig, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features) if cfg.fp_attn else BitLinear(in_features, out_features)


class MultiQueryAttention(nn.Module):
    """h query heads share one key and one value head; causal over the raster order of patches."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.heads, self.head_dim, self.dim = cfg.heads, cfg.head_dim, cfg.dim
        self.Wqkv = _projection(cfg, cfg.dim, cfg.dim + 2 * cfg.head_dim)
        self.out_proj = _projection(cfg, cfg.dim, cfg.dim)
        n = cfg.num_tokens
        future = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
        self.register_buffer("mask", torch.zeros(n, n).masked_fill(future, float("-inf")), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.Wqkv(x)
        q = qkv[..., : self.dim].reshape(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = qkv[..., self.dim : self.dim + self.head_dim].unsqueeze(1)
        v = qkv[..., self.dim + self.head_dim :].unsqueeze(1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + self.mask
        ctx = scores.softmax(dim=-1) @ v
        return self.out_proj(ctx.transpose(1, 2).reshape(b, n, self.dim))


class MultiHeadAttention(nn.Module):
    """Standard multi-head attention, q scaled after its projection, no mask."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.heads, self.head_dim, self.dim = cfg.heads, cfg.head_dim, cfg.dim
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            _projection(cfg, cfg.dim, cfg.dim) for _ in range(4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)

        q = heads(self.q_proj(x) * self.head_dim**-0.5)
        ctx = (q @ heads(self.k_proj(x)).transpose(-1, -2)).softmax(dim=-1) @ heads(self.v_proj(x))
        return self.out_proj(ctx.transpose(1, 2).reshape(b, n, self.dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.net = nn.Sequential(BitLinear(cfg.dim, cfg.mlp_dim), nn.GELU(), BitLinear(cfg.mlp_dim, cfg.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Block(nn.ModuleList):
    """Indexed like the reference: 0 attention, 3 feed-forward, 6 pre-attention LayerNorm (fp_attn)."""

    def __init__(self, cfg: ViTConfig):
        attn = MultiQueryAttention(cfg) if cfg.multi_query else MultiHeadAttention(cfg)
        norm = nn.LayerNorm(cfg.dim) if cfg.fp_attn else nn.Identity()
        idle = [nn.Identity() for _ in range(5)]
        super().__init__([attn, idle[0], idle[1], FeedForward(cfg), idle[2], idle[3], norm])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self[0](self[6](x))
        return x + self[3](x)


class Transformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block(x)
        return x


class Patchify(nn.Module):
    """img[B,C,H,W] -> [B, N, P*P*C]: tokens row-major over the grid, features (row, col, channel)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.p, self.g = cfg.patch_size, cfg.grid

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        b, c = img.shape[:2]
        x = img.reshape(b, c, self.g, self.p, self.g, self.p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, self.g * self.g, self.p * self.p * c)


class BitMedViT(nn.Module):
    """forward(img) -> logits; with `with_matcher` the training-only matcher output too."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.to_patch_embedding = nn.Sequential(Patchify(cfg), nn.Linear(cfg.patch_dim, cfg.dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, cfg.num_tokens, cfg.dim) * 0.02)
        self.transformer = Transformer(cfg)
        self.classifier = nn.Sequential(nn.LayerNorm(cfg.dim), nn.Linear(cfg.dim, cfg.num_classes))
        if cfg.matcher_dim:
            self.matcher = nn.Sequential(nn.LayerNorm(cfg.dim), nn.Linear(cfg.dim, cfg.matcher_dim))
        self.with_matcher = False

    def forward(self, img: torch.Tensor):
        x = self.transformer(self.to_patch_embedding(img) + self.pos_embedding)
        logits = self.classifier(x.mean(dim=1))
        if self.with_matcher and self.cfg.matcher_dim:
            return logits, self.matcher(x)
        return logits
