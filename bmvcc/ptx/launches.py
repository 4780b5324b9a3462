"""The kernel launches of TVM PrimFuncs built for CUDA: which kernel, grid, block, dynamic shared memory and
which of the PrimFunc's parameters each kernel argument is.

They are read from TVM's lowered host code (tvm.tirx's default pipeline for the target, which ends in
MakePackedAPI): each `T.call_ffi_kernel("name", buf.data, ..., extents..., launch_params=[...])` passes
buffers declared on the packed arguments (`X_handle = ... T.tvm_struct_get(args, i, ...)`), then one
value per launch parameter (blockIdx.*, threadIdx.*, tirx.use_dyn_shared_memory); a buffer may also be a
`.view(...)` of one declared so. bmvcc's shapes are static, so every extent is a constant.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

_CALL = re.compile(r'T\.call_ffi_kernel\("([\w$]+)", (.*?), launch_params=\[(.*?)\]')
_HANDLE = re.compile(r"(\w+)_handle: T\.let\[T\.handle\] = .*?T\.tvm_struct_get\(args, (\d+), 15")
_DECL = re.compile(r"(\w+) = T\.decl_buffer\(.*?data="
                   r"(?:T\.reinterpret\(.*?T\.tvm_struct_get\((\w+)_handle|(\w+)\.data)")
_VIEW = re.compile(r"(\w+) = (\w+)\.view\(")  # a reshaped view of a declared buffer (same data)
_INT = re.compile(r"^(?:T\.int(?:32|64)\()?(\d+)\)?$")


@dataclass(frozen=True)
class KernelLaunch:
    kernel: str  # the __global__ function's name
    args: tuple[int | None, ...]  # per kernel parameter: the index of the PrimFunc parameter it is (None: another
    grid: tuple[int | None, ...]  # buffer, e.g. a workspace); extents: None if not a constant
    block: tuple[int | None, ...]
    dynamic_shared: int | None

    def unsupported(self) -> str | None:
        """Why the emulator cannot run this launch from the artifact alone, or None."""
        if None in self.args:
            return f"kernel {self.kernel} takes a buffer that is not a parameter of its PrimFunc (a workspace)"
        if None in (*self.grid, *self.block, self.dynamic_shared):
            return f"kernel {self.kernel} has a launch extent that is not a constant"
        return None

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
            root[name] = root.get(handle) if handle else root.get(parent)
        for name, parent in _VIEW.findall(text):
            root[name] = root.get(parent)
        name = str(gv.name_hint).removeprefix("__tvm_ffi_")
        found[name] = [_launch(root, m) for m in _CALL.finditer(text)]
    return found


def _launch(root: dict, m) -> KernelLaunch:
    args = [a.strip() for a in m.group(2).split(",")]
    params = [p.strip().strip('"') for p in m.group(3).split(",")]
    values, buffers = args[len(args) - len(params):], args[:len(args) - len(params)]
    dims = {p: int(im.group(1)) if (im := _INT.match(v)) else None for p, v in zip(params, values)}
    indices = [root.get(b[:-5]) if b.endswith(".data") else None for b in buffers]
    return KernelLaunch(m.group(1), tuple(indices), tuple(dims.get(f"blockIdx.{a}", 1) for a in "xyz"),
                        tuple(dims.get(f"threadIdx.{a}", 1) for a in "xyz"), dims.get("tirx.use_dyn_shared_memory", 0))
