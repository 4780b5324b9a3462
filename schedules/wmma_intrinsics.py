"""DLight's tensor-core matmul rule without `import tvm.s_tir.tensor_intrin.cuda`.

DLight's Matmul rule, for an fp16 (or int8) matmul with every extent above 64, runs
`from tvm.s_tir.tensor_intrin.cuda import get_wmma_intrin_group`. Importing that module parses every
CUDA intrinsic TVM has (about a hundred TVMScript functions: 40 to 90 s on the 2-core build machine,
and its package imports the Arm, x86, ROCm and Hexagon ones too), which would make a GPU build with
fp16 matmuls (passes/fp16_matmuls.py) several times slower. `dlight_wmma()` stands in for that
module while DLight runs: its get_wmma_intrin_group returns the same group of wmma intrinsics
(16x16x16 load A / load B / fill / mma / store, for the requested scopes and dtypes), registered on
request under "bmvcc_" + TVM's name (schedules/intrinsics.py). With the real module already imported
it is left alone; the stand-in is removed afterwards, so a later real import registers TVM's names
undisturbed. `metaschedule_cuda` does the same for MetaSchedule's import of every target's intrinsics.

`tvm_definition(name)` gives the (desc, impl) of one of TVM's intrinsics from TVM's own generator functions:
the namespace of tensor_intrin/cuda.py, executed once without its module-level registrations (the
generators parse their TVMScript only when called), then the arguments of `name`'s registration there.
DLight and MetaSchedule import TVM's modules by name inside their own functions, hence the sys.modules
stand-ins; TVM 0.27 has no way to import its generators without registering (and parsing) all of them.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import sys
import types
from pathlib import Path

TVM_MODULE = "tvm.s_tir.tensor_intrin.cuda"
PACKAGE = "tvm.s_tir.tensor_intrin"  # imported by MetaSchedule's TuneContext: every target's intrinsics
_tvm: dict = {}  # namespace of TVM's cuda.py without its registrations (_tvm_generators), loaded once


@functools.cache
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


def tvm_definition(name: str):
    """(desc, impl) of TVM's CUDA intrinsic `name`: the arguments of its registration in tensor_intrin/cuda.py
    (`TensorIntrin.register(NAME, *generator(...))`), evaluated with TVM's generators."""
    g = _tvm_generators()
    tree, path = _tvm_source()
    (node,) = [n for n in tree.body if _is_registration(n)
               and eval(compile(ast.Expression(n.value.args[0]), path, "eval"), g) == name]
    return eval(compile(ast.Expression(node.value.args[1].value), path, "eval"), g)


def get_wmma_intrin_group(load_scope: str, store_scope: str, in_dtype: str, out_dtype: str,
                          trans_b: bool) -> dict[str, str]:
    """TVM's function of that name, over intrinsics registered under "bmvcc_" + TVM's name on first request."""
    from .intrinsics import DLIGHT_PREFIX, ensure

    names = _tvm_generators()["get_wmma_intrin_group"](load_scope, store_scope, in_dtype, out_dtype, trans_b)
    return {role: ensure(DLIGHT_PREFIX + name) for role, name in names.items()}


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
    from .intrinsics import ensure_all

    ensure_all("metaschedule")
    if PACKAGE in sys.modules:
        yield
        return
    stand_in = sys.modules[PACKAGE] = types.ModuleType(PACKAGE)
    try:
        yield
    finally:
        if sys.modules.get(PACKAGE) is stand_in:
            del sys.modules[PACKAGE]
