"""Small BitNet-style vision transformers written from the published recipes (not bmvcc's model):
BitLinear as the BitNet papers and their training notes describe it, in four spellings, dropped into
a CLS-token ViT and a DeiT-style model (distillation token). Used by test_bitnet_models.py.

Spellings (BitLinear.forward):
- "b158_ste": BitNet b1.58 as in its training notes: RMSNorm inside the layer, absmean ternary
  weights and per-token absmax int8 activations, scales with an epsilon clamp, round().clamp(),
  straight-through estimators x + (q(x) - x).detach() on both, bias;
- "clamp_round": the block's LayerNorm in front (none inside), clamp(round(.)), absmax without
  epsilon, scales divided then multiplied back (q * gamma / 127), weights codes * mean|W|, bias;
- "codes": weights stored as int8 ternary codes times one float scale, RMSNorm with a learned gain,
  straight-through estimator on the activations, no bias;
- "binary_v1": BitNet (v1): LayerNorm inside, binary weights sign(W - mean W) * mean|W|,
  straight-through estimators, bias.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

EPS = 1e-5


def absmax_quant(x: torch.Tensor) -> torch.Tensor:
    """Per-token absmax int8 fake quantization, the b1.58 recipe's activation_quant."""
    scale = 127.0 / x.abs().max(dim=-1, keepdim=True).values.clamp(min=EPS)
    return (x * scale).round().clamp(-128, 127) / scale


def ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return x + (q - x).detach()


class B158Ste(nn.Linear):
    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
        w = self.weight
        scale = 1.0 / w.abs().mean().clamp(min=EPS)
        wq = (w * scale).round().clamp(-1, 1) / scale
        return F.linear(ste(x, absmax_quant(x)), ste(w, wq), self.bias)


class ClampRound(nn.Linear):
    def forward(self, x):
        gamma = x.abs().amax(dim=-1, keepdim=True)
        xq = torch.clamp(torch.round(x / gamma * 127), -128, 127) * gamma / 127
        beta = self.weight.abs().mean()
        wq = torch.clamp(torch.round(self.weight / (beta + EPS)), -1, 1) * beta
        return F.linear(xq, wq, self.bias)


class Codes(nn.Module):
    """A trained BitLinear saved as its ternary codes (int8 buffer) and one scale."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.scale = nn.Parameter(torch.ones(()))
        self.gain = nn.Parameter(torch.ones(in_features))

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * self.gain
        return F.linear(ste(x, absmax_quant(x)), self.codes.to(x.dtype) * self.scale)


class BinaryV1(nn.Linear):
    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features)
        self.norm = nn.LayerNorm(in_features)

    def forward(self, x):
        x = self.norm(x)
        gamma = x.abs().max(dim=-1, keepdim=True).values.clamp(min=EPS)
        xq = (x * (127.0 / gamma)).round().clamp(-128, 127) * (gamma / 127.0)
        w = self.weight
        wb = torch.sign(w - w.mean()) * w.abs().mean()
        return F.linear(ste(x, xq), ste(w, wb), self.bias)


SPELLINGS = {"b158_ste": B158Ste, "clamp_round": ClampRound, "codes": Codes, "binary_v1": BinaryV1}


class Attention(nn.Module):
    """timm-style: one qkv BitLinear, heads split by reshape/permute, SDPA, out-projection."""

    def __init__(self, layer, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = layer(dim, 3 * dim), layer(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class SplitAttention(nn.Module):
    """q, k, v BitLinears of their own, heads by view/transpose, context flattened back."""

    def __init__(self, layer, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.proj = (layer(dim, dim) for _ in range(4))

    def forward(self, x):
        b, n, c = x.shape

        def split(t):
            return t.view(b, n, self.heads, c // self.heads).transpose(1, 2)

        ctx = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.proj(ctx.transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, layer, attention, dim: int, heads: int, mlp: int, gelu: str):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = attention(layer, dim, heads)
        self.fc1, self.act, self.fc2 = layer(dim, mlp), nn.GELU(approximate=gelu), layer(mlp, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """CLS-token ViT: conv patch embedding, learned positions, pre-LN blocks, float head on CLS.
    `distilled` makes it DeiT-style: a distillation token and head, the two heads averaged."""

    def __init__(self, layer, image: int = 28, channels: int = 1, patch: int = 7, dim: int = 32, depth: int = 2,
                 heads: int = 4, mlp: int = 64, classes: int = 10, distilled: bool = False):
        super().__init__()
        tokens = (image // patch) ** 2 + 1 + distilled
        attention, gelu = (SplitAttention, "tanh") if distilled else (Attention, "none")
        self.embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.tokens = nn.Parameter(torch.zeros(1, 1 + distilled, dim))
        self.pos = nn.Parameter(torch.zeros(1, tokens, dim))
        self.blocks = nn.Sequential(*(Block(layer, attention, dim, heads, mlp, gelu) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.heads = nn.ModuleList(nn.Linear(dim, classes) for _ in range(1 + distilled))

    def forward(self, img):
        x = self.embed(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.tokens.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.norm(self.blocks(x))
        return sum(head(x[:, i]) for i, head in enumerate(self.heads)) / len(self.heads)


def deit(layer) -> ViT:
    return ViT(layer, image=32, channels=3, patch=8, dim=48, depth=1, heads=3, mlp=96, distilled=True)


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Eval-mode model with trained-looking weights: Linear weights randn / sqrt(fan_in), ternary
    codes and their scale, norm gains near 1, small biases and embeddings."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            noise = torch.randn(p.shape, generator=gen)
            if p.dtype == torch.int8:  # ternary codes, about a third zeros
                p.copy_(torch.randint(-1, 2, p.shape, generator=gen))
            elif name.endswith(".scale"):
                p.copy_(0.8 / math.sqrt(model.blocks[0].norm1.normalized_shape[0]) * (1 + 0.1 * noise.abs()))
            elif p.dim() >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif name.endswith("weight") or name.endswith("gain"):
                p.copy_(1.0 + 0.3 * noise)
            else:
                p.copy_(0.2 * noise)
    return model.eval()
