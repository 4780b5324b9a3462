"""ONNX models -> Relax through TVM's ONNX frontend (tvm.relax.frontend.onnx).

`load` reads and validates the file (one line per problem: corrupt or truncated file, external data
that is missing or outside the model's folder, an opset or operator TVM's frontend does not implement,
an input that is not one float NCHW image batch);
`to_relax` imports it with a static batch through TVM's ONNX graph importer (what `from_onnx` runs),
with three differences that make bmvcc's passes see an exported BitLinear as they see one from a
checkpoint:
- ONNX `Clip` with constant bounds becomes `relax.clip`, the spelling torch.export gives, where TVM's
  converter emits two opaque TE calls (maximum, minimum) that no Relax pattern can read;
- `DequantizeLinear` of a constant with one scale and zero point (a quantized weight) becomes its
  definition, `(astype(x, float32) - zp) * scale`, plain arithmetic that the passes evaluate at
  compile time like a checkpoint's weight quantization (instead of `relax.dequantize`);
- `Cast` of an int8 weight constant (bmvcc export-onnx's `Cast(codes) * step`) stays `astype`, where
  TVM's converter folds it (and the Mul after it) into an anonymous float constant: the weight keeps
  its name and reads as the same dequantization;
- every initializer constant carries its ONNX name in its span, as bmvcc.frontend gives PyTorch
  weights their parameter names (the pass reports name layers by it).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BmvccError
from .sources import check_exists

MIN_OPSET = 13  # older opsets (before ONNX 1.8; other Softmax/Reduce* semantics) are outside what bmvcc tests


@dataclass(frozen=True)
class OnnxGraph:
    """A checked ONNX model and what the compiler needs to know about its one input and output."""

    model: object  # onnx.ModelProto
    opset: int
    input_name: str
    input_shape: tuple[int, ...]  # (C, H, W)
    batch: int | None  # None: the batch dimension is dynamic
    num_classes: int


def load(path: Path) -> OnnxGraph:
    import onnx
    from google.protobuf.message import DecodeError

    path = check_exists(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
        if not model.opset_import or not model.graph.node:  # an empty file parses as an empty model
            raise ValueError("no graph")
    except (DecodeError, ValueError, OSError, RuntimeError) as e:
        raise BmvccError(f"'{path}' is not an ONNX model, or it is truncated or corrupt ({_first_line(e)}); "
                         "export it again (bmvcc export-onnx)") from None
    _load_external_data(model, path)
    opset = _check_opset(model, path)
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError, RuntimeError) as e:
        raise BmvccError(f"'{path}' is not a valid ONNX model, or it is truncated or corrupt ({_first_line(e)}); "
                         "export it again (bmvcc export-onnx)") from None
    name, shape, batch = _image_input(model, path)
    return OnnxGraph(model, opset, name, shape, batch, _num_classes(model, path))


def _load_external_data(model, path: Path) -> None:
    """Reads the tensors the model keeps in external data files into it. Each file must be inside the
    model's folder: a location that leaves it (absolute, through '..' or a link) is refused before
    anything is read."""
    import onnx
    from onnx import external_data_helper as external

    folder = path.parent.resolve()
    tensors = [t for t in external._get_all_tensors(model) if external.uses_external_data(t)]
    for tensor in tensors:
        location = external.ExternalDataInfo(tensor).location
        target = (folder / location).resolve()
        if Path(location).is_absolute() or not target.is_relative_to(folder):
            raise BmvccError(f"'{path}' keeps tensor '{tensor.name}' in '{location}', outside the model's folder; "
                             "refused: keep external data files next to the model (onnx.save with a relative location)")
        if not target.is_file():
            raise BmvccError(f"'{path}' keeps tensor '{tensor.name}' in '{location}', which is missing; "
                             f"copy that file into '{path.parent}' beside the model")
    if tensors:
        try:
            external.load_external_data_for_model(model, str(folder))
        except (onnx.checker.ValidationError, ValueError, OSError) as e:
            raise BmvccError(f"the external data of '{path}' cannot be read ({_first_line(e)}); "
                             "export the model again") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


def _converters() -> dict:
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    return _get_convert_map()


def _versions(converter) -> list[int]:
    return sorted(int(n.removeprefix("_impl_v")) for n in dir(converter) if n.startswith("_impl_v"))


def max_supported_opset() -> int:
    """The newest opset any converter of TVM's ONNX frontend implements."""
    return max(v for c in _converters().values() for v in _versions(c))


def _check_opset(model, path: Path) -> int:
    domains = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    opset = domains.get("ai.onnx")
    newest = max_supported_opset()
    if opset is None or not MIN_OPSET <= opset <= newest:
        raise BmvccError(f"'{path}' uses ONNX opset {opset}, which TVM's ONNX frontend does not support "
                         f"(bmvcc imports opsets {MIN_OPSET}..{newest}); export it again with --opset 20")
    converters = _converters()
    for node in model.graph.node:
        if (node.domain or "ai.onnx") != "ai.onnx":
            raise BmvccError(f"'{path}' uses operator {node.domain}.{node.op_type}, outside the standard ONNX "
                             "domain that TVM's ONNX frontend imports; export with standard ONNX ops only")
        conv = converters.get(node.op_type)
        if conv is None and node.op_type != "Constant":
            raise BmvccError(f"'{path}' uses ONNX operator {node.op_type}, which TVM's ONNX frontend does not "
                             "implement; export the model without it")
    return opset


def _dims(value_info) -> list:
    """Static sizes as ints, dynamic ones (dim_param or unknown) as None."""
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]


def _image_input(model, path: Path) -> tuple[str, tuple[int, ...], int | None]:
    import onnx

    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise BmvccError(f"'{path}' has {len(inputs)} inputs; bmvcc compiles models with one NCHW image input")
    inp = inputs[0]
    dims = _dims(inp)
    elem = inp.type.tensor_type.elem_type
    if elem != onnx.TensorProto.FLOAT or len(dims) != 4:
        kind = onnx.TensorProto.DataType.Name(elem).lower()
        raise BmvccError(f"'{path}' input '{inp.name}' is a {len(dims)}-D {kind} tensor; bmvcc needs a 4-D "
                         "float32 NCHW image batch: export the model with a (B, C, H, W) float input")
    if None in dims[1:]:
        raise BmvccError(f"'{path}' input '{inp.name}' has dynamic channel or image sizes {dims[1:]}; "
                         "export it with a fixed (C, H, W)")
    c, h, w = dims[1:]
    if c not in (1, 3) and w in (1, 3):
        raise BmvccError(f"'{path}' input '{inp.name}' of shape {dims} looks NHWC; bmvcc needs NCHW images: "
                         "export the model with channels first")
    return inp.name, (c, h, w), dims[0]


def _num_classes(model, path: Path) -> int:
    outputs = model.graph.output
    dims = _dims(outputs[0]) if len(outputs) == 1 else []
    if len(outputs) != 1 or len(dims) != 2 or dims[1] is None:
        raise BmvccError(f"'{path}' must have one output of shape (B, classes) with a fixed class count; "
                         "export the logits only")
    return dims[1]


def resolve_batch(graph: OnnxGraph, batch: int | None, path: Path) -> int | None:
    """The static batch to compile: the model's own, or --batch (None if not given) where the model's is dynamic."""
    if graph.batch is None:
        return batch
    if batch is not None and batch != graph.batch:
        raise BmvccError(f"'{path}' was exported for batch {graph.batch}; drop --batch or pass --batch {graph.batch} "
                         "(or export it again without --batch)")
    return graph.batch


def to_relax(graph: OnnxGraph, batch: int):
    """Relax IRModule with `main(img[batch, C, H, W]) -> logits`, every weight a constant."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx.onnx_frontend import ONNXGraphImporter, get_type

    class _Importer(ONNXGraphImporter):
        def _parse_graph_initializers(self, onnx_graph):
            super()._parse_graph_initializers(onnx_graph)
            for init in onnx_graph.initializer:
                const = self._nodes[init.name]
                span = tvm.ir.Span(tvm.ir.SourceName(init.name), 0, 0, 0, 0)
                self._nodes[init.name] = relax._ffi_api.MakeTensorConst(const.value, None, span)

        def _convert_operator(self, op_name, inputs, attrs, opset):
            if op_name == "DequantizeLinear" and not attrs.get("block_size", 0):
                dequantized = _per_tensor_dequantize(inputs)
                if dequantized is not None:
                    return self.bb.normalize(dequantized)
            if op_name == "Cast" and _is_int8_weight(inputs[0]):
                return self.bb.normalize(relax.op.astype(inputs[0], get_type(attrs["to"])))
            if op_name == "Clip" and opset >= 11:
                bounds = [_const_scalar(inputs[1]), _const_scalar(inputs[2])]
                if all(b is not False for b in bounds):
                    lo = -np.inf if bounds[0] is None else bounds[0]
                    hi = np.inf if bounds[1] is None else bounds[1]
                    return self.bb.normalize(relax.op.clip(inputs[0], lo, hi))
            return super()._convert_operator(op_name, inputs, attrs, opset)

    importer = _Importer({graph.input_name: [batch, *graph.input_shape]}, {graph.input_name: "float32"},
                         keep_params_in_input=False, sanitize=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            mod = importer.from_onnx(graph.model.graph, graph.opset)
        except Exception as e:  # noqa: BLE001  converter failures surface as assorted exception types
            raise BmvccError(f"TVM's ONNX frontend could not import the model ({type(e).__name__}: "
                             f"{_first_line(e)}); export it with bmvcc export-onnx") from None
    main = mod["main"].without_attr("num_input")
    out = mod.clone()
    out["main"] = main
    return out


def _per_tensor_dequantize(inputs):
    """(x - zp) * scale for a constant x with a one-element scale and zero point, else None."""
    import tvm
    from tvm import relax

    x, scale, zp = inputs[0], inputs[1], inputs[2]
    s, z = _const_scalar(scale), (0.0 if zp is None else _const_scalar(zp))
    if not isinstance(x, tvm.ir.GenericConst) or s in (None, False) or z is False:
        return None
    dtype = str(scale.value.dtype)
    w = relax.op.astype(x, dtype)
    if z:
        w = relax.op.subtract(w, relax.const(z, dtype))
    return relax.op.multiply(w, scale)


def _is_int8_weight(e) -> bool:
    import tvm

    return isinstance(e, tvm.ir.GenericConst) and str(e.value.dtype) == "int8" and len(e.value.shape) >= 2


def _const_scalar(e):
    """A one-element constant's value as a float, None for an absent input, False otherwise (NaN too)."""
    import tvm

    if e is None:
        return None
    if isinstance(e, tvm.ir.GenericConst) and hasattr(e.value, "shape"):
        a = e.value.numpy()
        if a.size == 1 and a.dtype.kind in "fiu" and not np.isnan(a).any():
            return float(a.reshape(()))
    return False
