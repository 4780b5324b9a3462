"""Export a BitMedViT checkpoint as a standard ONNX model of its deployment forward.

Each BitLinear becomes `DeployBitLinear`: its ternary codes are an int8 initializer read as
`Cast(codes, float) * (1/s_w)`, so the graph carries the quantized model rather than the latent
float weights. The activation quantization is the same math as
bmvcc.model.BitLinear (RMSNorm, per-token absmax to int8 with round-half-even). The causal mask of
multi-query attention is a constant. Everything else is bmvcc.model itself, exported by torch.onnx's
torch.export-based exporter (which needs onnxscript).

The exporter writes the weight as `DequantizeLinear(codes, 1/s_w, 0)` (torch would constant-fold
a Cast into a float initializer); `_dequantize_as_cast` then spells it as Cast+Mul, the same values:
ONNX Runtime's default graph optimizations rewrite DequantizeLinear+MatMul into its MatMulNBits
kernel, whose arithmetic moves the logits by ~1e-2, while Cast+Mul of constants it folds to the
exact float weight, so default sessions match PyTorch. bmvcc's ONNX import reads both spellings.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.ao.quantization.fx import _decomposed  # noqa: F401  (registers quantized_decomposed ops)
from torch.nn import functional as F

from . import __version__, resources
from .artifact import write_error
from .errors import BmvccError
from .model import SCALE_EPS, BitLinear, BitMedViT, MultiQueryAttention
from .onnx_output import DEFAULT_OPSET, PRODUCER_KEY, check_opset, check_request

EXPORTER_MIN_OPSET = 18  # torch.onnx emits opset 18 or newer; 17 is converted down with onnx's converter
INPUT_NAME, OUTPUT_NAME = "img", "logits"


class DeployBitLinear(nn.Module):
    """BitLinear with frozen ternary weights: y = xq @ (codes * step)^T, xq the int8-grid activation.

    `weight` holds the codes (int8, [out, in]; named like the latent weight, so the ONNX initializer
    keeps the layer's name) and `step` = float32(1 / s_w); both come from BitLinear's latent weight
    as in its eval mode, so the output equals BitLinear's bit for bit in PyTorch.
    """

    def __init__(self, layer: BitLinear):
        super().__init__()
        w = layer.weight.detach()
        s_w = 1.0 / w.abs().mean().clamp(min=SCALE_EPS)
        self.norm = copy.deepcopy(layer.norm)
        self.register_buffer("weight", (w * s_w).round().clamp(-1, 1).to(torch.int8))
        # codes * float32(1/s_w) == codes / s_w exactly, since codes are in {-1, 0, 1}
        self.step = float(1.0 / s_w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xn = self.norm(x)
        s_x = 127.0 / xn.abs().amax(dim=-1, keepdim=True).clamp(min=SCALE_EPS)
        xq = (xn * s_x).round().clamp(-128, 127) / s_x
        w = torch.ops.quantized_decomposed.dequantize_per_tensor(self.weight, self.step, 0, -1, 1, torch.int8)
        return F.linear(xq, w)


def deployment_model(model: BitMedViT) -> BitMedViT:
    """A copy of `model` (eval mode) with every BitLinear replaced by a DeployBitLinear and one causal
    mask tensor shared by all blocks (the export then holds it once: 4 MB at 1024 tokens)."""
    deployed = copy.deepcopy(model).eval()
    mask = None
    for name, module in list(deployed.named_modules()):
        if isinstance(module, BitLinear):
            parent, _, attr = name.rpartition(".")
            setattr(deployed.get_submodule(parent), attr, DeployBitLinear(module))
        elif isinstance(module, MultiQueryAttention):
            mask = module.mask if mask is None else mask
            module.mask = mask
    return deployed


def export_checkpoint(source_path: Path, output: Path, batch: int | None = None, opset: int | None = None,
                      heads: int | None = None, image_size: int | None = None, trust_pickle: bool = False,
                      force: bool = False, progress: Callable[[str], None] = lambda msg: None) -> dict:
    """Load a BitMedViT state dict as `bmvcc compile` does and write its ONNX export to `output`, which
    may replace an existing file only when bmvcc exported it, or with `force`."""
    from . import frontend

    output = Path(output)
    opset = DEFAULT_OPSET if opset is None else opset
    check_request(source_path, output, opset, heads, force)
    progress(f"loading {source_path}")
    source = frontend.load_source(Path(source_path), heads=heads, image_size=image_size, trust_pickle=trust_pickle)
    progress("exporting with torch.onnx (torch.export-based exporter)")
    layers = export_onnx(source.module, output, batch=batch, opset=opset)
    return {"output": str(output), "batch": batch, "opset": opset, "bitlinear_layers": layers,
            "bytes": output.stat().st_size}


def export_onnx(model: BitMedViT, path: Path, batch: int | None = None, opset: int = DEFAULT_OPSET) -> int:
    """Write `model`'s deployment forward to `path` (atomically); batch None keeps the batch dynamic.

    Returns the number of BitLinear layers exported with int8 codes.
    """
    import onnx

    check_opset(opset)
    if batch is not None and batch < 1:
        raise BmvccError(f"--batch {batch} must be at least 1")
    cfg = model.cfg
    resources.check_compile(sum(p.numel() for p in model.parameters()), (cfg.channels, cfg.image_size, cfg.image_size),
                            batch or 2, resources.bitmedvit_activations(cfg), action="exporting")
    deployed = deployment_model(model)
    example = torch.zeros(batch or 2, cfg.channels, cfg.image_size, cfg.image_size)
    dynamic = None if batch else ({0: torch.export.Dim("batch")},)
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(deployed, (example,), dynamo=True,
                                        opset_version=max(opset, EXPORTER_MIN_OPSET),
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes=dynamic, external_data=False, verbose=False)
        except Exception as e:  # noqa: BLE001  the exporter raises its own error types, e.g. for an opset it lacks
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise BmvccError(f"torch.onnx could not export opset {opset} ({first}); pass --opset {DEFAULT_OPSET}") from None
    proto = program.model_proto
    _dequantize_as_cast(proto)
    if opset < EXPORTER_MIN_OPSET:
        proto = _convert_down(proto, opset)
    exported = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if exported != opset:
        raise BmvccError(f"torch.onnx wrote opset {exported} instead of {opset}; pass --opset {DEFAULT_OPSET}")
    onnx.checker.check_model(proto, full_check=True)
    proto.metadata_props.add(key=PRODUCER_KEY, value=__version__)  # marks the file as one bmvcc may replace
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(proto.SerializeToString())
        os.replace(tmp, path)
    except OSError as e:
        raise write_error(e, path) from None
    finally:
        tmp.unlink(missing_ok=True)
    return sum(isinstance(m, DeployBitLinear) for m in deployed.modules())


def _dequantize_as_cast(proto) -> None:
    """Replace each `DequantizeLinear(codes, step, 0)` (zero point 0, see DeployBitLinear) by
    `Mul(Cast(codes, float), step)` in place, dropping the zero-point initializers left unused."""
    from onnx import TensorProto, helper

    nodes, zero_points = [], set()
    for node in proto.graph.node:
        if node.op_type != "DequantizeLinear":
            nodes.append(node)
            continue
        codes, step, *zero_point = node.input
        zero_points.update(zero_point)
        cast = f"{node.output[0]}_codes"
        nodes += [helper.make_node("Cast", [codes], [cast], name=f"{node.name}_cast", to=TensorProto.FLOAT),
                  helper.make_node("Mul", [cast, step], list(node.output), name=node.name)]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    used = {name for node in nodes for name in node.input}
    kept = [t for t in proto.graph.initializer if t.name not in zero_points or t.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)


def _convert_down(proto, opset: int):
    """onnx's version converter, minus the `noop_with_empty_axes` it leaves on Reduce* nodes when
    going below 18 (an attribute those ops only gained in 18; bmvcc's exports never set it)."""
    import onnx.version_converter

    proto = onnx.version_converter.convert_version(proto, opset)
    for node in proto.graph.node:
        for attr in list(node.attribute):
            if node.op_type in ("ReduceMean", "ReduceMax") and attr.name == "noop_with_empty_axes" and attr.i == 0:
                node.attribute.remove(attr)
    return proto
