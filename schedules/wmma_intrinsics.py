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
_tvm: dict = {}  # TVM's get_wmma_* functions, loaded once


def _tvm_generators() -> dict:
    if not _tvm:
        import tvm.s_tir

        path = Path(tvm.s_tir.__file__).parent / "tensor_intrin" / "cuda.py"
        tree = ast.parse(path.read_text(), str(path))
        keep = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
                or isinstance(n, ast.FunctionDef) and n.name.startswith("get_wmma_")]
        # compiled under the file's own name: TVMScript reads each prim_func's source from it
        exec(compile(ast.Module(keep, type_ignores=[]), str(path), "exec"), _tvm)
    return _tvm


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
