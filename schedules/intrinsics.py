"""bmvcc's tensor intrinsics: the one table, each registered with TVM on first use.

INTRINSICS[name] = (user, "module:function", args): function(*args), of that module of this package,
returns the intrinsic's (description, implementation) PrimFuncs. `ensure(name)` registers it
(tvm.s_tir.TensorIntrin.register) the first time it is named and returns the name: every tensorize call
names its intrinsic through ensure. `ensure_all(user)` registers a user's whole set, for what replays traces
that name them (a tuning database: bmvcc/tunedb.py; a MetaSchedule TuneContext). Users:
  w2a8_cpu      dot_intrinsics.py: the int8 dot products of the CPU W2A8 schedules
  matmul_cpu    bf16_intrinsics.py: vdpbf16ps, the bf16 micro kernel of cpu_rules/matmul.py
  w2a8_cuda     cuda_intrinsics.py: ldmatrix, mma.sync on decoded 2-bit weights, fill, dequantizing store
  dlight        TVM's wmma intrinsics (wmma_intrinsics.py), for DLight's tensor-core matmul rule, under
                "bmvcc_" + TVM's name, so that TVM's own module can still register its names
  metaschedule  TVM's intrinsics under TVM's names, those MetaSchedule's default CUDA tensor-core space names
"""

from __future__ import annotations

import importlib

from ..errors import InternalError
from . import cuda_intrinsics as ci
from . import bf16_intrinsics, dot_intrinsics
from .w2a8 import EPILOGUES

SHARED_SCOPES = ("shared", "shared.dyn")  # static __shared__ arrays, or dynamic shared memory above 48 KB
ROW_FRAGMENTS = (1, 2, 4, 8)  # W2A8 CUDA warp tiles of 16, 32, 64 (w2a8_cuda.WARP_TILES), 128 rows (DEFAULT)
DLIGHT_PREFIX = "bmvcc_"
# What DLight's Matmul rules request (get_wmma_intrin_group: shared.dyn in and out, B transposed)
DLIGHT_WMMA = tuple(
    [f"wmma_fill_16x16x16_{t}" for t in ("f32", "f16", "s32")]
    + [f"wmma_load_16x16x16_{t}_{ab}_shared_dyn" for t in ("f16", "s8") for ab in ("a", "b_trans")]
    + [f"wmma_sync_16x16x16_{op}_trans" for op in ("f16f16f32", "f16f16f16", "s8s8s32")]
    + [f"wmma_store_16x16x16_{t}_shared_dyn" for t in ("f32", "f16", "s32")])
# The intrinsics TVM 0.27's ScheduleRule::DefaultCUDATensorCore names (MetaSchedule's default space for a
# CUDA target with tensor cores), which a TuneContext for such a target needs registered.
METASCHEDULE_TENSOR_CORE = tuple(
    [f"wmma_fill_16x16x16_{t}" for t in ("f32", "f16", "s32")]
    + [f"wmma_load_16x16x16_{t}_{ab}_shared_dyn" for t in ("f16", "s8") for ab in ("a", "b", "b_trans")]
    + [f"wmma_sync_16x16x16_{op}{trans}" for op in ("f16f16f32", "f16f16f16", "s8s8s32") for trans in ("", "_trans")]
    + [f"wmma_store_16x16x16_{t}_shared_dyn" for t in ("f32", "f16", "s32")]
    + [f"mma_init_m16n8k8_{t}" for t in ("f16", "f32")] + [f"mma_load_m16n8k8_f16_{ab}_shared_dyn" for ab in "AB"]
    + [f"mma_sync_m16n8k8_f16f16{t}" for t in ("f16", "f32")] + [f"mma_store_m16n8k8_{t}_global" for t in ("f16", "f32")])

INTRINSICS: dict[str, tuple[str, str, tuple]] = {
    **{n: ("w2a8_cpu", "dot_intrinsics:definition", (n,)) for n in dot_intrinsics.NAMES},
    bf16_intrinsics.NAME: ("matmul_cpu", "bf16_intrinsics:definition", ()),
    ci.FILL: ("w2a8_cuda", "cuda_intrinsics:fill", ()),
    **{ci.ldmatrix_a_name(s): ("w2a8_cuda", "cuda_intrinsics:ldmatrix_a", (s,)) for s in SHARED_SCOPES},
    **{ci.mma_decode_name(f, s): ("w2a8_cuda", "cuda_intrinsics:mma_decode", (f, s))
       for f in ROW_FRAGMENTS for s in SHARED_SCOPES},
    **{ci.store_dequant_name(e): ("w2a8_cuda", "cuda_intrinsics:store_dequant", (e,)) for e in EPILOGUES},
    **{DLIGHT_PREFIX + n: ("dlight", "wmma_intrinsics:tvm_definition", (n,)) for n in DLIGHT_WMMA},
    **{n: ("metaschedule", "wmma_intrinsics:tvm_definition", (n,)) for n in METASCHEDULE_TENSOR_CORE},
}


def ensure(name: str) -> str:
    """`name`, registered with TVM if it is not yet (INTRINSICS says how)."""
    from tvm.s_tir import TensorIntrin

    if TensorIntrin.get(name, allow_missing=True) is None:
        if name not in INTRINSICS:
            raise InternalError(f"tensor intrinsic '{name}' is neither registered with TVM nor in "
                                f"{__name__}.INTRINSICS, so a schedule cannot tensorize with it")
        _, entry, args = INTRINSICS[name]
        module, function = entry.split(":")
        TensorIntrin.register(name, *getattr(importlib.import_module(f"{__package__}.{module}"), function)(*args))
    return name


def ensure_all(user: str) -> None:
    for name, (owner, _, _) in INTRINSICS.items():
        if owner == user:
            ensure(name)
