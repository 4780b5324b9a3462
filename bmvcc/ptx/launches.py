"""The kernel launches of TVM PrimFuncs built for CUDA: which kernel, grid, block, dynamic shared memory and
which of the PrimFunc's parameters each kernel argument is.

They are read from TVM's lowered host code (tvm.tirx's default pipeline for the target, which ends in
MakePackedAPI): each `T.call_ffi_kernel("name", buf.data, ..., extents..., launch_params=[...])` passes
buffers declared on the packed arguments (`X_handle = ... T.tvm_struct_get(args, i, ...)`), then one
value per launch parameter (blockIdx.*, threadIdx.*, tirx.use_dyn_shared_memory). bmvcc's shapes are
static, so every extent is a constant.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from ..errors import BmvccError

_CALL = re.compile(r'T\.call_ffi_kernel\("([\w$]+)", (.*?), launch_params=\[(.*?)\]')
_HANDLE = re.compile(r"(\w+)_handle: T\.let\[T\.handle\] = .*?T\.tvm_struct_get\(args, (\d+), 15")
_DECL = re.compile(r"(\w+) = T\.decl_buffer\(.*?data="
                   r"(?:T\.reinterpret\(.*?T\.tvm_struct_get\((\w+)_handle|(\w+)\.data)")
_INT = re.compile(r"^(?:T\.int(?:32|64)\()?(\d+)\)?$")


@dataclass(frozen=True)
class KernelLaunch:
    kernel: str  # the __global__ function's name
    args: tuple[int, ...]  # per kernel parameter: the index of the PrimFunc parameter it is
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    dynamic_shared: int

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> KernelLaunch:
        return KernelLaunch(d["kernel"], tuple(d["args"]), tuple(d["grid"]), tuple(d["block"]), d["dynamic_shared"])


def kernel_launches(mod, target) -> dict[str, list[KernelLaunch]]:
    """{PrimFunc name: its kernel launches in order} of a module of scheduled PrimFuncs for a CUDA target."""
    import tvm

    with tvm.transform.PassContext(config={"tirx.use_async_copy": True}):
        lowered = tvm.tirx.transform.BindTarget(target.with_host(target.host))(mod)
        pipeline, _, _ = tvm.tirx.get_default_tir_pipeline(target)
        lowered = pipeline(lowered)
    found = {}
    for gv, func in lowered.functions_items():
        if int(func.attrs.get("calling_conv", 0)) == 2:  # a device kernel
            continue
        text = func.script()
        root = {name: int(i) for name, i in _HANDLE.findall(text)}
        for name, handle, parent in _DECL.findall(text):
            root[name] = root[handle] if handle else root.get(parent)
        name = str(gv.name_hint).removeprefix("__tvm_ffi_")
        found[name] = [_launch(root, m) for m in _CALL.finditer(text)]
    return found


def _launch(root: dict, m) -> KernelLaunch:
    args = [a.strip() for a in m.group(2).split(",")]
    params = [p.strip().strip('"') for p in m.group(3).split(",")]
    values, buffers = args[len(args) - len(params):], args[:len(args) - len(params)]
    dims = {}
    for p, v in zip(params, values):
        im = _INT.match(v)
        if im is None:
            raise BmvccError(f"kernel {m.group(1)} has a launch extent {p} = {v} that is not a constant; "
                             "this is a bmvcc bug")
        dims[p] = int(im.group(1))
    indices = []
    for b in buffers:
        if not b.endswith(".data") or root.get(b[:-5]) is None:
            raise BmvccError(f"kernel {m.group(1)} takes {b}, which is not a parameter buffer; this is a bmvcc bug")
        indices.append(root[b[:-5]])
    return KernelLaunch(m.group(1), tuple(indices), tuple(dims.get(f"blockIdx.{a}", 1) for a in "xyz"),
                        tuple(dims.get(f"threadIdx.{a}", 1) for a in "xyz"), dims.get("tirx.use_dyn_shared_memory", 0))
