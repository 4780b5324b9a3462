"""DLight's tensor-core matmul rule without `import tvm.s_tir.tensor_intrin.cuda`.

DLight's Matmul rule, for an fp16 (or int8) matmul with every extent above 64, runs
`from tvm.s_tir.tensor_intrin.cuda import get_wmma_intrin_group`. Importing that module parses every
CUDA intrinsic TVM has (about a hundred TVMScript functions: 40 to 90 s on the 2-core build machine,
and its package imports the Arm, x86, ROCm and Hexagon ones too), which would make a GPU build with
fp16 matmuls (passes/fp16_matmuls.py) several times slower. `dlight_wmma()` stands in for that
module while DLight runs: its get_wmma_intrin_group returns the same group of wmma intrinsics
(16x16x16 load A / load B / fill / mma / store, for the requested scopes and dtypes), registered on
request under "bmvcc_" + TVM's name from TVM's own generator functions (the get_wmma_* functions of
that file, executed without its module-level registrations). With the real module already imported
it is left alone; the stand-in is removed afterwards, so a later real import registers TVM's names
undisturbed.
"""

from __future__ import annotations

import ast
import contextlib
import sys
import types
from pathlib import Path

TVM_MODULE = "tvm.s_tir.tensor_intrin.cuda"
_PREFIX = "bmvcc_"
PACKAGE = "tvm.s_tir.tensor_intrin"  # imported by MetaSchedule's TuneContext: every target's intrinsics
# The intrinsics TVM 0.27's ScheduleRule::DefaultCUDATensorCore names (MetaSchedule's default space for a
# CUDA target with tensor cores), which a TuneContext for such a target needs registered.
METASCHEDULE_TENSOR_CORE = tuple(
    [f"wmma_fill_16x16x16_{t}" for t in ("f32", "f16", "s32")]
    + [f"wmma_load_16x16x16_{t}_{ab}_shared_dyn" for t in ("f16", "s8") for ab in ("a", "b", "b_trans")]
    + [f"wmma_sync_16x16x16_{op}{trans}" for op in ("f16f16f32", "f16f16f16", "s8s8s32") for trans in ("", "_trans")]
    + [f"wmma_store_16x16x16_{t}_shared_dyn" for t in ("f32", "f16", "s32")]
    + [f"mma_init_m16n8k8_{t}" for t in ("f16", "f32")] + [f"mma_load_m16n8k8_f16_{ab}_shared_dyn" for ab in "AB"]
    + [f"mma_sync_m16n8k8_f16f16{t}" for t in ("f16", "f32")] + [f"mma_store_m16n8k8_{t}_global" for t in ("f16", "f32")])
_tvm: dict = {}  # namespace of TVM's cuda.py without its registrations (_tvm_generators), loaded once


def _tvm_source() -> tuple[ast.Module, str]:
    import tvm.s_tir

    path = Path(tvm.s_tir.__file__).parent / "tensor_intrin" / "cuda.py"
    return ast.parse(path.read_text(), str(path)), str(path)


def _is_registration(node) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and ast.unparse(node.value.func) == "TensorIntrin.register"


def _tvm_generators() -> dict:
    """The namespace of TVM's tensor_intrin/cuda.py without its module-level registrations (its imports,
    constants and generator functions; the generators parse their TVMScript only when called)."""
    if not _tvm:
        tree, path = _tvm_source()
        keep = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.Assign))]
        # compiled under the file's own name: TVMScript reads each prim_func's source from it
        exec(compile(ast.Module(keep, type_ignores=[]), path, "exec"), _tvm)
    return _tvm


def register_tvm_intrinsics(names) -> None:
    """Register those of TVM's CUDA intrinsics `names` (TVM's own names) that are not registered yet, by
    running only their registrations from tensor_intrin/cuda.py. For a process that never imports that
    module (the real import would find these names taken)."""
    from tvm.s_tir import TensorIntrin

    missing = {n for n in names if TensorIntrin.get(n, allow_missing=True) is None}
    if not missing:
        return
    g = _tvm_generators()
    tree, path = _tvm_source()
    wanted = [n for n in tree.body if _is_registration(n) and eval(compile(ast.Expression(n.value.args[0]), path, "eval"), g) in missing]
    exec(compile(ast.Module(wanted, type_ignores=[]), path, "exec"), g)


def get_wmma_intrin_group(load_scope: str, store_scope: str, in_dtype: str, out_dtype: str,
                          trans_b: bool) -> dict[str, str]:
    """TVM's function of that name, over intrinsics registered here on first request."""
    from tvm.s_tir import TensorIntrin

    g = _tvm_generators()
    names = g["get_wmma_intrin_group"](load_scope, store_scope, in_dtype, out_dtype, trans_b)
    make = {"load_a": lambda: g["get_wmma_load_intrin"](16, 16, 16, in_dtype, load_scope, False, False),
            "load_b": lambda: g["get_wmma_load_intrin"](16, 16, 16, in_dtype, load_scope, True, trans_b),
            "init": lambda: g["get_wmma_fill_intrin"](16, 16, 16, out_dtype),
            "store": lambda: g["get_wmma_store_intrin"](16, 16, 16, out_dtype, store_scope),
            "compute": lambda: g["get_wmma_sync_intrin"](16, 16, 16, in_dtype, out_dtype, trans_b)}
    group = {}
    for role, name in names.items():
        group[role] = _PREFIX + name
        if TensorIntrin.get(group[role], allow_missing=True) is None:
            TensorIntrin.register(group[role], *make[role]())
    return group


@contextlib.contextmanager
def dlight_wmma():
    """Within: DLight's import of tvm.s_tir.tensor_intrin.cuda gets this module's stand-in."""
    if TVM_MODULE in sys.modules:
        yield
        return
    stand_in = types.ModuleType(TVM_MODULE, __doc__)
    stand_in.get_wmma_intrin_group = get_wmma_intrin_group
    sys.modules[TVM_MODULE] = stand_in
    try:
        yield
    finally:
        if sys.modules.get(TVM_MODULE) is stand_in:
            del sys.modules[TVM_MODULE]


@contextlib.contextmanager
def metaschedule_cuda():
    """Within: a MetaSchedule TuneContext for a CUDA target is created without importing PACKAGE (TVM's
    intrinsics for every target, about a minute here): an empty stand-in answers the import, and the
    intrinsics its default tensor-core space names are registered from TVM's own generators. Those names
    are then taken, so the real PACKAGE can no longer be imported in this process: every TuneContext for
    CUDA must be created within this (bmvcc tune: tune._context_imports)."""
    register_tvm_intrinsics(METASCHEDULE_TENSOR_CORE)
    if PACKAGE in sys.modules:
        yield
        return
    stand_in = sys.modules[PACKAGE] = types.ModuleType(PACKAGE)
    try:
        yield
    finally:
        if sys.modules.get(PACKAGE) is stand_in:
            del sys.modules[PACKAGE]
