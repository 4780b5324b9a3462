"""Read a BitMedViT state dict safely and infer its configuration from tensor shapes.

What is inferable (docs/bitmedvit.md): dim, depth, mlp_dim, channels and patch size
(P*P*C has one solution with C in {1, 3}), tokens hence image size, classes, multi_query, fp_attn and,
for multi-query checkpoints, heads. Heads of a multi-head checkpoint must be given.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Iterator, Mapping

import torch

from . import resources
from .errors import BmvccError
from .sources import check_exists
from .model import BitMedViT, ViTConfig

_LAYER = re.compile(r"^transformer\.layers\.(\d{1,9})\.")  # longer indices are no layer: unexpected keys
_WRAPPERS = ("state_dict", "model_state_dict", "model")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # cast to float32 on load
_LEGACY_MAGIC = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)  # how a legacy torch.save file starts
_PICKLES_SCANNED = 4  # a legacy torch.save file: magic number, protocol, sys info, the object (then raw storages)


def load_state_dict(path: Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True unless the user opted in; every failure is a BmvccError."""
    path = check_exists(path)
    _check_unpacked_size(path)
    try:
        with warnings.catch_warnings():  # e.g. torch's note on a pickle protocol it does not expect
            warnings.simplefilter("ignore", UserWarning)
            if trust_pickle:  # the user's explicit opt-in (--trust-pickle): unpickling may run the file's code
                obj = torch.load(path, map_location="cpu", weights_only=False)
            else:
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except (ImportError, AttributeError) as e:  # only with --trust-pickle: the pickled code is not here
        raise BmvccError(
            f"'{path}' refers to code that is not importable here ({_first_line(e)}); "
            "re-save it as a plain state_dict (torch.save(model.state_dict(), ...))"
        ) from None
    except Exception as e:  # torch.load's parsers raise anything (IndexError, RuntimeError, ...) on junk
        refused = [] if trust_pickle else _unsafe_globals(path)
        if refused:
            raise BmvccError(
                f"'{path}' needs code execution to load: its pickled code references {refused[0]}; re-save it "
                "as a plain state_dict, or pass --trust-pickle, only for files you trust"
            ) from None
        raise _unreadable(path, e) from None
    return _unwrap(obj, path)


def _check_unpacked_size(path: Path) -> None:
    """torch.load unpacks each record of a zip checkpoint to the size its directory declares (a
    deflated one too: 4 MB can declare 4 GB); refuse declarations beyond this machine's memory."""
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, EOFError):  # not a zip, or a damaged one: torch.load reports it
        return
    if declared > resources.machine_memory():
        raise BmvccError(f"'{path}' unpacks to {resources.human(declared)} of tensor data, this machine has "
                         f"{resources.human(resources.machine_memory())} of memory; it cannot be loaded here")


def _unsafe_globals(path: Path) -> list[str]:
    """The globals the file's pickles reference that torch's weights_only loader does not allow: in a
    torch zip's data.pkl, else in the pickles a legacy torch.save file or a plain pickle starts with.
    pickletools only parses opcodes; nothing is unpickled, so no payload runs."""
    from torch import _weights_only_unpickler as safe  # torch's own allowlist (torch is pinned)

    allowed = {*safe._get_allowed_globals(), *safe._get_user_allowed_globals()}
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("data.pkl")]
            found = [g for n in names for g in _pickle_globals(archive.open(n))]
    except (zipfile.BadZipFile, OSError, EOFError):
        with open(path, "rb") as f:
            found = list(_pickle_globals(f))
    return [g for g in dict.fromkeys(found) if g not in allowed]


def _pickle_globals(stream) -> Iterator[str]:
    """`module.name` of every GLOBAL, INST and STACK_GLOBAL in the first pickles of `stream`, up to
    damage; a STACK_GLOBAL whose two strings are not plainly pushed yields 'a computed global'."""
    memo, stack = {}, collections.deque(maxlen=2)  # the last two pushes: their strings, None for anything else
    for _ in range(_PICKLES_SCANNED):
        try:
            for op, arg, _pos in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST"):
                    yield arg.replace(" ", ".")
                elif op.name == "STACK_GLOBAL":
                    module, name = stack if len(stack) == 2 else (None, None)
                    yield f"{module}.{name}" if isinstance(module, str) and isinstance(name, str) else "a computed global"
                if op.name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                    memo[len(memo) if op.name == "MEMOIZE" else arg] = stack[-1] if stack else None
                elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                    stack.append(memo.get(arg))
                elif op.stack_after:
                    stack.append(arg if "STRING" in op.name or "UNICODE" in op.name else None)
        except Exception:  # damage or the end of the pickles: what was read is all there is
            return


def _unreadable(path: Path, e: BaseException) -> BmvccError:
    """A file torch.load cannot parse: a damaged checkpoint (zip archive or pickle cut short) or none."""
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    torch_file = head.startswith(b"PK\x03\x04") or head == _LEGACY_MAGIC  # torch.save's zip, or before PyTorch 1.6
    if torch_file or isinstance(e, EOFError) or "truncated" in str(e):
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
        if t.layout != torch.strided:
            raise BmvccError(f"'{path}': weight '{name}' is a {t.layout} tensor; save it with .to_dense()")
        if t.dtype not in FLOAT_DTYPES:
            raise BmvccError(f"'{path}': weight '{name}' is {t.dtype}; bmvcc reads float16, bfloat16, float32 and "
                             "float64 weights: save the float (latent) weights of the trained model")
        if t.untyped_storage().nbytes() < (t.storage_offset() + t.numel()) * t.element_size():
            raise BmvccError(f"'{path}': weight '{name}' claims {t.numel():,} values but its storage holds "
                             f"{t.untyped_storage().nbytes() // t.element_size():,} (a stride-0 or overlapping view, "
                             "as from expand or as_strided); save it with .contiguous()")
        if not torch.isfinite(t).all():
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
    depth = _depth(state)
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


def _depth(state: Mapping[str, torch.Tensor]) -> int:
    """The number of transformer layers, whose indices must run 0..depth-1 (the model is built from it)."""
    layers = sorted({int(m.group(1)) for k in state if (m := _LAYER.match(k))})
    if not layers or layers[0] != 0:
        raise BmvccError("missing key 'transformer.layers.0.*': not a BitMedViT state dict")
    gap = next((i for i, layer in enumerate(layers) if layer != i), None)
    if gap is not None:
        raise BmvccError(f"the checkpoint has transformer layer {layers[-1]} but no layer {gap}: layer indices must "
                         f"run 0..depth-1; the checkpoint is inconsistent")
    return len(layers)


def _split_patch_dim(patch_dim: int) -> tuple[int, int]:
    for channels in (1, 3):
        p = math.isqrt(patch_dim // channels)
        if p > 0 and patch_dim % channels == 0 and p * p * channels == patch_dim:
            return channels, p
    raise BmvccError(
        f"patch embedding input {patch_dim} is not P*P*C with C in (1, 3); not a BitMedViT checkpoint"
    )


def build_model(state: Mapping[str, torch.Tensor], cfg: ViTConfig) -> BitMedViT:
    """The eval-mode model with `state` loaded strictly; key and shape problems become BmvccErrors.

    Keys, shapes and memory are checked against the configuration before anything is allocated."""
    expected = expected_shapes(cfg)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise BmvccError(f"missing key '{missing[0]}' ({len(missing)} missing): the checkpoint does not match {_describe(cfg)}")
    if unexpected:
        raise BmvccError(f"unexpected key '{unexpected[0]}' ({len(unexpected)} unexpected): the checkpoint does not match {_describe(cfg)}")
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise BmvccError(
                f"'{key}' has shape {tuple(state[key].shape)} but the inferred configuration needs "
                f"{tuple(shape)}; the checkpoint's shapes contradict each other"
            )
    resources.check_compile(sum(math.prod(s) for s in expected.values()), (cfg.channels, cfg.image_size, cfg.image_size),
                            1, resources.bitmedvit_activations(cfg))
    model = BitMedViT(cfg)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


def expected_shapes(cfg: ViTConfig) -> dict[str, torch.Size]:
    """Every key of the configuration's state dict and its shape, allocating nothing: a one-layer
    model on the meta device, its layer's keys repeated for every layer."""
    with torch.device("meta"):
        one_layer = BitMedViT(dataclasses.replace(cfg, depth=1)).state_dict()
    shapes = {}
    for key, t in one_layer.items():
        for i in range(cfg.depth) if _LAYER.match(key) else [None]:
            shapes[key if i is None else key.replace("transformer.layers.0.", f"transformer.layers.{i}.", 1)] = t.shape
    return shapes


def _describe(cfg: ViTConfig) -> str:
    kind = "multi-query" if cfg.multi_query else "multi-head"
    attn = "float" if cfg.fp_attn else "BitLinear"
    return f"a {kind}/{attn}-attention BitMedViT (dim {cfg.dim}, depth {cfg.depth})"
