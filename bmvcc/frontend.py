"""Sources -> Relax: a BitMedViT state dict (rebuilt in PyTorch), a torch.export program (.pt2) or an
ONNX model (.onnx, imported by TVM's ONNX frontend)."""

from __future__ import annotations

import logging
import math
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import checkpoint, onnx_import, resources
from .errors import BmvccError
from .sources import check_source
from .model import BitMedViT, ViTConfig


@dataclass
class Source:
    """What the driver compiles: an eval-mode PyTorch module or an ONNX model, and the facts the
    artifact records."""

    module: torch.nn.Module | None  # None for an ONNX model
    input_shape: tuple[int, ...]  # per-image shape (C, H, W); the batch is chosen at compile time
    num_classes: int
    path: Path
    config: ViTConfig | None = None  # None for a .pt2 program or an ONNX model
    info: dict = field(default_factory=dict)
    onnx: onnx_import.OnnxGraph | None = None  # the checked ONNX model of an .onnx source


def load_source(path: Path, heads: int | None = None, image_size: int | None = None,
                trust_pickle: bool = False) -> Source:
    path = check_source(path, heads)
    if path.suffix == ".pt2":
        return _load_program(path)
    if path.suffix == ".onnx":
        return _load_onnx(path, image_size)
    state = checkpoint.load_state_dict(path, trust_pickle=trust_pickle)
    cfg = checkpoint.infer_config(state, heads=heads, image_size=image_size)
    model = checkpoint.build_model(state, cfg)
    return Source(model, (cfg.channels, cfg.image_size, cfg.image_size), cfg.num_classes, path, cfg)


def _load_program(path: Path) -> Source:
    export_log = logging.getLogger("torch.export")  # which logs a traceback for an archive it cannot read
    level = export_log.level
    export_log.setLevel(logging.ERROR)
    try:
        ep = torch.export.load(path)
    except (RuntimeError, zipfile.BadZipFile, KeyError, ValueError, EOFError, OSError) as e:
        detail = str(e).split(". Please check the warnings above")[0][:120]  # the warnings silenced above
        raise BmvccError(f"'{path}' is not a readable torch.export program ({detail}); save it with torch.export.save") from None
    finally:
        export_log.setLevel(level)
    args = ep.example_inputs[0] if ep.example_inputs else ()
    if len(args) != 1 or not isinstance(args[0], torch.Tensor) or args[0].dim() != 4:
        raise BmvccError(f"'{path}' must take one NCHW image tensor; export it with a single (B, C, H, W) input")
    module = ep.module()
    with torch.no_grad():
        out = module(args[0])
    out = out[0] if isinstance(out, (tuple, list)) else out
    image = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == ep.graph_signature.user_inputs[0])
    batch = image.meta["val"].shape[0]  # an int when exported without a dynamic batch dimension
    info = {"static_batch": batch} if isinstance(batch, int) else {}
    return Source(module, tuple(args[0].shape[1:]), int(out.shape[-1]), path, info=info)


def torch_logits(source: Source) -> Callable[[np.ndarray], np.ndarray]:
    """`source`'s PyTorch model as a numpy -> numpy function of [N, C, H, W] float32 images: the first
    output of a tuple, and for a .pt2 program exported for a fixed batch (which takes no other) images in
    chunks of that batch, the last padded with zeros (their logits dropped)."""
    from .runtime import in_batches

    def run_batch(chunk: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = source.module(torch.from_numpy(chunk))
        return (out[0] if isinstance(out, (tuple, list)) else out).numpy()

    return lambda images: in_batches(images, source.info.get("static_batch") or max(len(images), 1), run_batch)


def _load_onnx(path: Path, image_size: int | None) -> Source:
    graph = onnx_import.load(path)
    if image_size is not None and (image_size, image_size) != graph.input_shape[1:]:
        raise BmvccError(f"--image-size {image_size} contradicts '{path}' (input {graph.input_shape}); drop the option")
    return Source(None, graph.input_shape, graph.num_classes, path, onnx=graph)


def resolve_batch(source: Source, batch: int | None, progress: Callable[[str], None] = lambda msg: None) -> int:
    """The static batch to compile: --batch, else an ONNX model's or a .pt2 program's own, else 1
    (said through `progress` for an ONNX model with a dynamic batch)."""
    if source.onnx is not None:
        batch = onnx_import.resolve_batch(source.onnx, batch, source.path)
        if batch is None:
            progress(f"'{source.path.name}' has a dynamic batch dimension; using batch 1 (pass --batch N for another)")
    fixed = source.info.get("static_batch")
    if fixed is not None and batch not in (None, fixed):
        raise BmvccError(f"'{source.path}' was exported for a fixed batch of {fixed}; drop --batch, or export it "
                         "with dynamic_shapes={0: torch.export.Dim('batch')} for the image")
    batch = fixed if batch is None else batch
    return 1 if batch is None else batch


def export(source: Source, batch: int) -> torch.export.ExportedProgram:
    """The program as trained: a BitMedViT with a matcher head returns (logits, matcher); the
    pipeline's drop_training_outputs pass removes what deployment does not need."""
    example = torch.zeros((batch, *source.input_shape))
    module = source.module
    matcher = isinstance(module, BitMedViT) and bool(module.cfg.matcher_dim)
    saved = getattr(module, "with_matcher", False)
    try:
        if matcher:
            module.with_matcher = True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.export.export(module, (example,))
    finally:
        if matcher:
            module.with_matcher = saved


def to_relax(source: Source, batch: int):
    """Relax IRModule with `main(img[batch, C, H, W])` returning what the module returns, every
    weight a constant whose span's source name is its PyTorch parameter name (for reports)."""
    from tvm.relax.frontend.torch import from_exported_program

    if batch < 1:
        raise BmvccError(f"--batch {batch} must be at least 1")
    _check_memory(source, batch)
    if source.onnx is not None:
        return onnx_import.to_relax(source.onnx, batch)
    ep = export(source, batch)
    with warnings.catch_warnings():  # torch's run_decompositions deep-copies a LeafSpec, which warns (torch 2.13)
        warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
        try:
            mod = from_exported_program(ep, keep_params_as_input=True, custom_convert_map=_CONVERTERS)
        except AssertionError as e:  # TVM's frontend asserts on operators it has no converter for
            raise BmvccError(f"TVM's PyTorch frontend cannot import '{source.path}' ({str(e)[:160]}); "
                             "export the model without those operators") from None
    return _bind_named_params(mod, ep)


def _amax(node, importer):
    """aten.amax (x.amax(dim), how absmax quantizers are often written) -> relax.max; TVM 0.27 has no converter."""
    from tvm import relax

    x = importer.env[node.args[0]]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", [])
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    axis = [dim] if isinstance(dim, int) else list(dim)
    return importer.block_builder.emit(relax.op.max(x, axis=axis or None, keepdims=bool(keepdim)))


_CONVERTERS = {"amax.default": _amax}


def _check_memory(source: Source, batch: int) -> None:
    """Refuses a compile at `batch` that this machine's memory cannot hold (bmvcc.resources)."""
    if source.onnx is not None:
        weights = sum(math.prod(t.dims) for t in source.onnx.model.graph.initializer)
    else:
        weights = sum(t.numel() for t in source.module.state_dict().values())
    activations = resources.bitmedvit_activations(source.config) if source.config else 0
    resources.check_compile(weights, source.input_shape, batch, activations)


def _bind_named_params(mod, ep):
    import tvm
    from tvm import relax

    names = {spec.arg.name: spec.target for spec in ep.graph_signature.input_specs if spec.target}
    main = mod["main"]
    n_in = int(main.attrs["num_input"])
    binding = {}
    for var, value in zip(main.params[n_in:], main.attrs["params"]):
        span = tvm.ir.Span(tvm.ir.SourceName(names.get(var.name, var.name)), 0, 0, 0, 0)
        binding[var] = relax._ffi_api.MakeTensorConst(value, None, span)
    func = main.bind_params(binding).without_attr("params").without_attr("num_input")
    out = mod.clone()
    out["main"] = func
    return out
