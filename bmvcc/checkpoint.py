"""Read a BitMedViT state dict safely and infer its configuration from tensor shapes.

What is inferable (docs/bitmedvit.md): dim, depth, mlp_dim, channels and patch size
(P*P*C has one solution with C in {1, 3}), tokens hence image size, classes, multi_query, fp_attn and,
for multi-query checkpoints, heads. Heads of a multi-head checkpoint must be given.
"""

from __future__ import annotations

import hashlib
import math
import pickle
import re
from pathlib import Path
from typing import Mapping

import torch

from .errors import BmvccError
from .sources import check_exists
from .model import BitMedViT, ViTConfig

_LAYER = re.compile(r"^transformer\.layers\.(\d+)\.")
_WRAPPERS = ("state_dict", "model_state_dict", "model")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_state_dict(path: Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True unless the user opted in; every failure is a BmvccError."""
    path = check_exists(path)
    try:
        if trust_pickle:  # the user's explicit opt-in (--trust-pickle): unpickling may run the file's code
            obj = torch.load(path, map_location="cpu", weights_only=False)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):  # weights_only refused a class or function reference
            raise BmvccError(
                f"'{path}' needs to run pickled code to load; re-save it as a plain state_dict, "
                "or pass --trust-pickle if you trust its source"
            ) from None
        raise _unreadable(path, e) from None
    except (ImportError, AttributeError) as e:  # only with --trust-pickle: the pickled code is not here
        raise BmvccError(
            f"'{path}' refers to code that is not importable here ({_first_line(e)}); "
            "re-save it as a plain state_dict (torch.save(model.state_dict(), ...))"
        ) from None
    except Exception as e:  # torch.load's parsers raise anything (IndexError, RuntimeError, ...) on junk
        raise _unreadable(path, e) from None
    return _unwrap(obj, path)


def _unreadable(path: Path, e: BaseException) -> BmvccError:
    """A file torch.load cannot parse: a damaged checkpoint (zip archive or pickle cut short) or none."""
    with open(path, "rb") as f:
        zip_magic = f.read(4) == b"PK\x03\x04"  # what torch.save writes since PyTorch 1.6
    if zip_magic or isinstance(e, EOFError) or "truncated" in str(e):
        return BmvccError(f"'{path}' is truncated or corrupt ({_first_line(e)}); copy the checkpoint again")
    return BmvccError(f"'{path}' is not a PyTorch checkpoint ({_first_line(e)}); pass a .pth state dict "
                      "saved with torch.save(model.state_dict(), path)")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in _WRAPPERS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise BmvccError(
            f"'{path}' holds a {type(obj).__name__}, not a state dict; save model.state_dict() instead"
        )
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise BmvccError(f"'{path}' entry '{bad[0]}' is not a tensor; save model.state_dict() instead")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    for name, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise BmvccError(f"'{path}': weight '{name}' has NaN or Inf values; export a finite checkpoint")
    return state


def _need(state: Mapping[str, torch.Tensor], key: str, ndim: int) -> torch.Tensor:
    if key not in state:
        raise BmvccError(f"missing key '{key}': not a BitMedViT state dict (see docs/bitmedvit.md for the format)")
    t = state[key]
    if t.dim() != ndim:
        raise BmvccError(f"'{key}' has shape {tuple(t.shape)}, expected {ndim} dimensions; the checkpoint is inconsistent")
    return t


def infer_config(
    state: Mapping[str, torch.Tensor], heads: int | None = None, image_size: int | None = None
) -> ViTConfig:
    """The configuration implied by the tensor shapes; `heads` and `image_size` supply or check."""
    patch_w = _need(state, "to_patch_embedding.1.weight", 2)
    pos = _need(state, "pos_embedding", 3)
    dim, patch_dim = patch_w.shape
    tokens = pos.shape[1]
    if pos.shape[2] != dim:
        raise BmvccError(f"pos_embedding width {pos.shape[2]} contradicts the patch embedding width {dim}")
    channels, patch = _split_patch_dim(patch_dim)
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise BmvccError(f"pos_embedding has {tokens} tokens, not a square grid; the checkpoint is inconsistent")
    if image_size is not None and image_size != grid * patch:
        raise BmvccError(
            f"--image-size {image_size} contradicts the checkpoint ({grid}x{grid} patches of {patch} px "
            f"= {grid * patch}); drop the option or pass {grid * patch}"
        )
    depth = 1 + max((int(m.group(1)) for k in state if (m := _LAYER.match(k))), default=-1)
    if depth == 0:
        raise BmvccError("missing key 'transformer.layers.0.*': not a BitMedViT state dict")
    mlp_dim = _need(state, "transformer.layers.0.3.net.0.weight", 2).shape[0]
    multi_query = "transformer.layers.0.0.Wqkv.weight" in state
    fp_attn = "transformer.layers.0.6.weight" in state
    if multi_query:
        rows = _need(state, "transformer.layers.0.0.Wqkv.weight", 2).shape[0]
        head_dim, odd = divmod(rows - dim, 2)
        if odd or head_dim <= 0 or dim % head_dim:
            raise BmvccError(f"Wqkv has {rows} rows, which is not dim + 2*head_dim for dim {dim}")
        inferred = dim // head_dim
        if heads is not None and heads != inferred:
            raise BmvccError(f"--heads {heads} contradicts Wqkv (head size {head_dim} gives {inferred} heads); drop --heads")
        heads = inferred
    elif heads is None:
        raise BmvccError(
            "the number of heads of a multi-head checkpoint cannot be inferred from its shapes; pass --heads H"
        )
    elif heads <= 0 or dim % heads:
        raise BmvccError(f"--heads {heads} does not divide dim {dim}; pass a divisor of {dim}")
    classes = _need(state, "classifier.1.weight", 2).shape[0]
    matcher = state.get("matcher.1.weight")
    return ViTConfig(
        image_size=grid * patch, patch_size=patch, channels=channels, num_classes=classes, dim=dim,
        depth=depth, heads=heads, mlp_dim=mlp_dim, multi_query=multi_query, fp_attn=fp_attn,
        matcher_dim=0 if matcher is None else matcher.shape[0],
    )


def _split_patch_dim(patch_dim: int) -> tuple[int, int]:
    for channels in (1, 3):
        p = math.isqrt(patch_dim // channels)
        if patch_dim % channels == 0 and p * p * channels == patch_dim:
            return channels, p
    raise BmvccError(
        f"patch embedding input {patch_dim} is not P*P*C with C in (1, 3); not a BitMedViT checkpoint"
    )


def build_model(state: Mapping[str, torch.Tensor], cfg: ViTConfig) -> BitMedViT:
    """The eval-mode model with `state` loaded strictly; key and shape problems become BmvccErrors."""
    model = BitMedViT(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise BmvccError(f"missing key '{missing[0]}' ({len(missing)} missing): the checkpoint does not match {_describe(cfg)}")
    if unexpected:
        raise BmvccError(f"unexpected key '{unexpected[0]}' ({len(unexpected)} unexpected): the checkpoint does not match {_describe(cfg)}")
    for key, ref in expected.items():
        if state[key].shape != ref.shape:
            raise BmvccError(
                f"'{key}' has shape {tuple(state[key].shape)} but the inferred configuration needs "
                f"{tuple(ref.shape)}; the checkpoint's shapes contradict each other"
            )
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


def _describe(cfg: ViTConfig) -> str:
    kind = "multi-query" if cfg.multi_query else "multi-head"
    attn = "float" if cfg.fp_attn else "BitLinear"
    return f"a {kind}/{attn}-attention BitMedViT (dim {cfg.dim}, depth {cfg.depth})"
