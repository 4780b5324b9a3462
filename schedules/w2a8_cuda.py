"""W2A8 tensor-core schedule for NVIDIA Ampere (sm_80/86/87; tuned defaults for Jetson Orin Nano).

Schedules `tc_compute`, schedules/w2a8.py's `w2a8_compute` with the weights in the TC_LAYOUT defined here (every
step is an s_tir.Schedule primitive):

    global --cp.async (LDGSTS, `stages`-deep pipeline)--> shared: q tile [BM, BK] int8,
                                                          packed tile [BN/16, BK/32, 128] uint8 (2 bits/weight)
    shared q --ldmatrix.x4--> warp A fragments
    shared packed --one 32-bit LDS per lane: 16 weights, two masks, three shifts, four prmt lookups--> B fragment
        decoded in registers, once per 16-column strip and k step, feeding all of the warp's row fragments
        (cuda_intrinsics.mma_decode)
    mma.sync.m16n8k32.s8.s8.s32 -> int32 accumulators (registers)
    epilogue: out = float(acc) * (w_scale / x_scale[row]), then GELU (in registers) or + residual[row, col]
        (read from global memory) per the config, from the registers to global memory in one store.

Weights cross global and shared memory at 2 bits each; they are never expanded to int8 in memory.
Tiles of up to 48 KB live in static __shared__ arrays; larger ones (tuning candidates, up to the 163 KB
per block sm_87 allows) in dynamic shared memory, whose limit TVM's CUDA runtime raises at launch.

Shapes: the tiles need M % BM == N % BN == K % BK == 0. `default_knobs` shrinks the tiles until they
divide the shape (ViT shapes need no padding); otherwise the kernel is `tc_compute(padded(cfg, knobs))`
and the caller pads (q with 0, packed with code 1 = weight 0, x_scale with 1, residual with 0) and slices
the output: `padded` and `pad_operands` define it. The epilogue reads accumulators through LowerWarpMemory, which
emits one SHFL (to the own lane) per element.

Entry points (schedules/kernels.py): `schedule(func, target, knobs)`, the hand schedule (the GPU build's, with
the knobs of its kernel table), and `space(sch, target)`, the tuning space; both apply `_schedule`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np

from ..targets.cuda import STATIC_SHARED_BYTES
from . import cuda_intrinsics as ci
from .intrinsics import ensure
from .w2a8 import KERNEL_ATTR, W2A8Config, config_of, epilogue_operand, w2a8_compute

PACKED_ZERO = 0x55  # a packed byte of four codes u = 1, i.e. four zero weights


class TCLayout:
    """The packed layout of the tensor-core kernel, chosen at compile time for CUDA targets (the CPU keeps
    schedules/w2a8.py's; passes/pad_w2a8_to_tiles.py relays the weights out, `tc_pack` is the same in numpy):
    uint8[N/16, K/32, 128], one 128-byte block per 16 output features x 32 k, i.e. the B operand of one
    mma.m16n8k32 pair. Its 32 little-endian words are the warp's 32 lanes: word L holds the 16 weights lane L
    needs, code u = T + 1 of weight (n, k) of the block with n = 8h + L/4 and k = 16r + 4(L%4) + i (B fragment
    register 2h + r, byte i; h, r in {0, 1}, i < 4) at bits 16h + 4i + 2r of word L. So w & 0x33333333 holds
    registers 0 and 2 (r = 0) as prmt selector nibbles (low and high 16 bits), (w >> 2) & 0x33333333 registers
    1 and 3 (cuda_intrinsics.mma_decode): one 32-bit shared load decodes into 16 weights."""

    def shape(self, n: int, k: int) -> tuple[int, int, int]:
        if n % 16 or k % 32:
            raise ValueError(f"TC_LAYOUT needs N a multiple of 16 and K of 32, not {n} x {k}; pad the GEMM (padded)")
        return n // 16, k // 32, 128

    def position(self, n, k):
        """(byte of its block, bit offset in that byte) of code u[n, k] (ints, numpy arrays or TIR expressions)."""
        return (16 * (n % 8) + 4 * (k % 16 // 4) + 2 * (n % 16 // 8) + k % 4 // 2,
                4 * (k % 2) + 2 * (k % 32 // 16))

    def locate(self, wp, n, k):
        """(the byte of wp holding code u[n, k], the code's bit offset in it): schedules/w2a8.py's layout interface."""
        byte, shift = self.position(n, k)
        return wp[n // 16, k // 32, byte], shift


TC_LAYOUT = TCLayout()


def tc_order() -> np.ndarray:
    """int64[128, 4]: entry [b, j] = 32n + k of the weight whose code is bits 2j of byte b of a TC_LAYOUT block."""
    n, k = np.meshgrid(np.arange(16), np.arange(32), indexing="ij")
    byte, shift = TC_LAYOUT.position(n, k)
    order = np.empty((128, 4), np.int64)
    order[byte, shift // 2] = 32 * n + k
    return order


def tc_pack(packed: np.ndarray) -> np.ndarray:
    """The contract's packed weights uint8[N, K/4] (N a multiple of 16, K of 32) in TC_LAYOUT."""
    n, kp = packed.shape
    codes = (packed[..., None] >> np.array([0, 2, 4, 6], np.uint8)) & 3
    blocks = codes.reshape(n // 16, 16, kp // 8, 32).transpose(0, 2, 1, 3).reshape(n // 16, kp // 8, 512)
    return np.ascontiguousarray((blocks[..., tc_order()] << np.array([0, 2, 4, 6], np.uint8)).sum(-1, dtype=np.uint8))


def tc_relayout(packed, n: int, k: int):
    """Relax ops relaying packed weights uint8[n, k/4] (n a multiple of 16, k of 32) out in TC_LAYOUT: tc_pack,
    step by step (passes/pad_w2a8_to_tiles.py emits them; FoldConstant runs them at compile time)."""
    from tvm import relax

    shifts = relax.const(np.array([0, 2, 4, 6], np.uint8))
    codes = relax.op.bitwise_and(relax.op.right_shift(relax.op.expand_dims(packed, [-1]), shifts),
                                 relax.const(3, "uint8"))
    blocks = relax.op.permute_dims(relax.op.reshape(codes, [n // 16, 16, k // 32, 32]), [0, 2, 1, 3])
    slots = relax.op.take(relax.op.reshape(blocks, [n // 16, k // 32, 512]), relax.const(tc_order()), axis=2,
                          mode="clip")  # in range: clip only silences "fast" mode's warning
    return relax.op.sum(relax.op.left_shift(slots, shifts), axis=[-1])


def tc_compute(cfg: W2A8Config):
    """The compute definition of the tensor-core kernel: w2a8_compute with the weights in TC_LAYOUT."""
    return w2a8_compute(cfg, TC_LAYOUT)


@dataclass(frozen=True)
class W2A8CudaKnobs:
    """Tile sizes and pipeline depth of one kernel instance (the tuning space)."""

    block_m: int = 128  # rows of out per thread block
    block_n: int = 128  # columns of out per thread block
    block_k: int = 64  # k per pipeline stage (multiple of 32)
    warps_m: int = 1  # warps along M; warp tile = (block_m / warps_m) x (block_n / warps_n)
    warps_n: int = 4
    stages: int = 3  # shared-memory buffers in flight (cp.async pipeline depth, >= 2)

    def __post_init__(self):
        wm, wn = self.block_m // max(self.warps_m, 1), self.block_n // max(self.warps_n, 1)
        if (self.block_k % 32 or wm % 16 or wn % 16 or wm * self.warps_m != self.block_m
                or wn * self.warps_n != self.block_n or self.stages < 2):
            raise ValueError(f"invalid W2A8 CUDA knobs {self}: warp tiles must be multiples of 16x16, "
                             "block_k a multiple of 32, stages >= 2")
        if not (self.q_vector and self.packed_vector):
            raise ValueError(f"invalid W2A8 CUDA knobs {self}: the q and packed tiles must split into one "
                             "4-, 8- or 16-byte (packed: 8- or 16-byte) cp.async vector per thread per copy round")

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n

    def _vector(self, tile_bytes: int, row_bytes: int, widths=(16, 8, 4)) -> int:
        """Widest cp.async size (of `widths` bytes; 0 if none) dividing a row and tiling the tile evenly."""
        return next((v for v in widths if row_bytes % v == 0 and tile_bytes % (v * self.threads) == 0), 0)

    @property
    def q_vector(self) -> int:
        return self._vector(self.block_m * self.block_k, self.block_k)

    @property
    def packed_vector(self) -> int:
        """TC_LAYOUT: 4 * block_k contiguous bytes per 16 columns; copies of 8 or 16 bytes (were every access of the
        packed tile 4 bytes wide, as the decode's loads are, TVM would retype it to uint32, and then reject its
        cp.async from the uint8 weights)."""
        return self._vector(self.block_n * self.block_k // 4, 4 * self.block_k, (16, 8))

    def fits(self, facts: dict) -> bool:
        """Within a CUDA target's shared memory per block (opt-in) and block size (targets/cuda.py facts)."""
        return self.shared_bytes() <= facts["max_shared_bytes_per_block"] and self.threads <= 1024

    def shared_bytes(self) -> int:
        """Shared memory per block: `stages` copies of the q tile (rows padded by 16 B) and packed tile."""
        return self.stages * (self.block_m * (self.block_k + 16) + self.block_n * self.block_k // 4)


# 4 warps of 128x32 along N for large M (the ViT token GEMMs: 1024 x 2048 x 512 is 128 blocks on 8 SMs): each
# weight of the block tile is decoded once per CTA, and its decode feeds 8 row fragments;
# for few rows one 16-row warp strip per warp along N and a deeper pipeline, since the kernel is
# then bound by streaming the packed weights.
DEFAULT = W2A8CudaKnobs()
SMALL_M = W2A8CudaKnobs(block_m=16, block_n=128, block_k=128, warps_m=1, warps_n=4, stages=4)


def default_knobs(cfg: W2A8Config) -> W2A8CudaKnobs:
    """DEFAULT (or SMALL_M for m <= 32), with tiles shrunk by powers of two until they divide M, N and K
    (so that typical ViT shapes need no padding); DEFAULT/SMALL_M with padding if none does."""
    base = SMALL_M if cfg.m <= 32 else DEFAULT

    def sizes(v):
        return [v >> s for s in range(4) if v >> s >= 16]

    block_ks = dict.fromkeys((base.block_k, 64, 32))
    for bm, bn, bk in itertools.product(sizes(base.block_m), sizes(base.block_n), block_ks):
        if cfg.m % bm or cfg.n % bn or cfg.k % bk:
            continue
        try:
            return replace(base, block_m=bm, block_n=bn, block_k=bk, warps_m=min(base.warps_m, bm // 16),
                           warps_n=min(base.warps_n, bn // 16))
        except ValueError:
            continue
    return base


# The tuning space (tuning_knobs): per dimension the two largest of these warp-tile edges that divide it
# (mma fragments are 16; the accumulators of a 64x64 tile already take 128 of 255 registers), 1-8 warps,
# k steps of 32-128 and 2-4 pipeline stages with at least 128 of k in flight. The cp.async vector widths
# follow from the tiles (W2A8CudaKnobs.q_vector / packed_vector: the widest that fits).
WARP_TILES = (16, 32, 64)
WARP_COUNTS = (1, 2, 4)
BLOCK_KS = (32, 64, 128)
STAGE_COUNTS = (2, 3, 4)
MIN_K_IN_FLIGHT = 128
MAX_TUNING_THREADS = 256


def estimated_registers(knobs: W2A8CudaKnobs) -> int:
    """Registers per thread, estimated: the int32 accumulators (one per 32 of the warp tile), the A fragments
    of one k step (4 per 16 rows), the decoded B fragment (4) and 48 for addresses and the pipeline (ptxas
    gives 183-191 for 64x64 warp tiles, estimated 196)."""
    wm, wn = knobs.block_m // knobs.warps_m, knobs.block_n // knobs.warps_n
    return wm * wn // 32 + 4 * (wm // 16) + 4 + 48


def tuning_knobs(cfg: W2A8Config, facts: dict) -> list[W2A8CudaKnobs]:
    """Every knob set of the tuning space that computes cfg without padding (tiles divide M, N, K) and fits
    a CUDA target with `facts` (targets/cuda.py: shared memory per block with opt-in, registers per thread
    and per SM);
    default_knobs(cfg) first when it divides cfg, so that tuning starts from what compile builds."""
    def edges(dim):
        return [e for e in WARP_TILES if dim % e == 0][-2:]

    found = []
    for wm, wn, warps_m, warps_n, block_k, stages in itertools.product(edges(cfg.m), edges(cfg.n), WARP_COUNTS,
                                                                          WARP_COUNTS, BLOCK_KS, STAGE_COUNTS):
        if warps_m * warps_n * 32 > MAX_TUNING_THREADS or block_k * stages < min(MIN_K_IN_FLIGHT, cfg.k):
            continue
        try:
            knobs = W2A8CudaKnobs(block_m=wm * warps_m, block_n=wn * warps_n, block_k=block_k, warps_m=warps_m,
                                  warps_n=warps_n, stages=stages)
        except ValueError:  # no cp.async vector width splits the tiles evenly over the threads
            continue
        regs = estimated_registers(knobs)
        if (padded(cfg, knobs) == cfg and knobs.fits(facts) and regs <= facts["max_registers_per_thread"]
                and regs * knobs.threads <= facts["registers_per_sm"]):
            found.append(knobs)
    default = default_knobs(cfg)
    return ([default] if padded(cfg, default) == cfg else []) + [k for k in found if k != default]


def space(sch, target) -> list:
    """MetaSchedule design spaces of the W2A8 PrimFunc in `sch` for a CUDA target: one schedule per knob
    set of tuning_knobs, each fully determined (no sampled decisions: MetaSchedule samples a population by
    replaying a design space's trace with fresh random decisions, so a knob chosen in Python from a sampled
    value would not replay). The search therefore picks among these schedules by measurement."""
    from ..targets.cuda import limits

    cfg = config_of(sch.mod["main"])
    knobs = tuning_knobs(cfg, limits(str(target.attrs["arch"])))
    if not knobs:
        raise ValueError(f"no W2A8 CUDA knob set divides {cfg}; tune the padded kernel (w2a8_cuda.padded)")
    spaces = []
    for k in knobs:
        candidate = sch.copy()
        _schedule(candidate, cfg, k)
        spaces.append(candidate)
    return spaces


def _round_up(v: int, q: int) -> int:
    return -(-v // q) * q


def padded(cfg: W2A8Config, knobs: W2A8CudaKnobs) -> W2A8Config:
    """The tile-aligned instance the kernel computes; equals cfg when cfg is already aligned."""
    return replace(cfg, m=_round_up(cfg.m, knobs.block_m), n=_round_up(cfg.n, knobs.block_n),
                   k=_round_up(cfg.k, knobs.block_k))


def pad_operands(cfg: W2A8Config, knobs: W2A8CudaKnobs, q, packed, x_scale, residual=None):
    """numpy operands of cfg -> operands of tc_compute(padded(cfg)): padding rows/columns contribute 0 (the
    residual, given for the "residual" epilogue, or the [1, N] bias of a bias epilogue, is padded with 0 and comes
    last); the packed weights padded, then in TC_LAYOUT."""
    p = padded(cfg, knobs)

    def pad(a, shape, dtype, value):
        out = np.full(shape, value, dtype)
        out[tuple(slice(0, d) for d in a.shape)] = a
        return out

    ops = [pad(q, (p.m, p.k), np.int8, 0), tc_pack(pad(packed, (p.n, p.k_packed), np.uint8, PACKED_ZERO)),
           pad(x_scale, (p.m, 1), np.float32, 1.0)]
    rows = 1 if epilogue_operand(cfg.epilogue) == "bias" else p.m
    return tuple(ops if residual is None else ops + [pad(residual, (rows, p.n), np.float32, 0.0)])


def schedule(func, target, knobs: W2A8CudaKnobs | None = None):
    """The W2A8 PrimFunc `func` (tc_compute of a config that is a multiple of the knobs' tiles; default knobs:
    default_knobs of its config) scheduled, marked tirx.is_scheduled so that DLight in a GPU build leaves it alone."""
    from tvm import s_tir

    cfg = config_of(func)
    sch = s_tir.Schedule(func)
    _schedule(sch, cfg, knobs or default_knobs(cfg))
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _schedule(sch, cfg: W2A8Config, knobs: W2A8CudaKnobs) -> None:
    """Schedule `sch`, which holds tc_compute(cfg) with cfg a multiple of the knobs' tiles, in place:
    schedule primitives only, so the trace replays on the unscheduled function (the tuning database)."""
    if padded(cfg, knobs) != cfg:
        raise ValueError(f"W2A8 {cfg} is not a multiple of the tiles of {knobs}; schedule padded(cfg, knobs)")
    weights = tuple(int(d) for d in sch.mod["main"].params[1].shape)
    if weights != TC_LAYOUT.shape(cfg.n, cfg.k):
        raise ValueError(f"W2A8 weights {weights} are not in TC_LAYOUT; schedule tc_compute(cfg)")
    acc, deq = sch.get_sblock("acc"), sch.get_sblock("dequant")
    wm, wn = knobs.block_m // knobs.warps_m, knobs.block_n // knobs.warps_n

    # the inner block is a warp's column of tensor-core tiles, (wm x 16) x 32: one B decode feeds wm / 16 tiles
    i, j, k = sch.get_loops(acc)
    i, i_tc = sch.split(i, [None, wm])
    j, j_tc = sch.split(j, [None, 16])
    k, k_tc = sch.split(k, [None, 32])
    sch.reorder(i, j, k, i_tc, j_tc, k_tc)
    tile = sch.blockize(i_tc)

    # block tile -> warps -> 16-wide column fragments; k -> pipeline stages of block_k
    i0, i1 = sch.split(i, [None, knobs.warps_m])
    j0, j1, j2 = sch.split(j, [None, knobs.warps_n, wn // 16])
    k0, k1 = sch.split(k, [None, knobs.block_k // 32])
    sch.reorder(i0, j0, i1, j1, k0, k1, j2)
    sch.bind(sch.fuse(i0, j0), "blockIdx.x")
    warp = sch.fuse(i1, j1)
    sch.bind(warp, "threadIdx.y")

    # accumulators live in registers (warp fragments); the dequantizing epilogue reads them there
    sch.set_scope(tile, 0, "warp")
    sch.reverse_compute_at(deq, warp)

    # above ptxas's 48 KB of static __shared__ arrays, dynamic shared memory (TVM's runtime opts in at launch)
    scope = "shared.dyn" if knobs.shared_bytes() > STATIC_SHARED_BYTES else "shared"

    def to_shared(idx, vec):
        blk = sch.cache_read(tile, idx, scope)
        sch.compute_at(blk, k0)
        # the copy's loops after (blockIdx, warp, k0): q [BM, BK], packed [BN/16, BK/32, 128]
        _, ty, tx, v = sch.split(sch.fuse(*sch.get_loops(blk)[3:]), [None, knobs.warps_m * knobs.warps_n, 32, vec])
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")
        sch.vectorize(v)
        return blk

    q_s = to_shared(0, knobs.q_vector)
    sch.storage_align(q_s, 0, axis=-2, factor=32, offset=16)  # 16 B row skew: conflict-free ldmatrix
    to_shared(1, knobs.packed_vector)

    a_w = sch.cache_read(tile, 0, "warp")
    sch.compute_at(a_w, k1)
    r, c = sch.get_loops(a_w)[-2:]
    r0, r1 = sch.split(r, [None, 16])
    c0, c1 = sch.split(c, [None, 32])
    sch.reorder(r0, c0, r1, c1)
    sch.transform_layout(a_w, ("write", 0), lambda a, b: (a // 16, b // 32, *ci.ldmatrix_16x32_layout(a % 16, b % 32)))
    sch.transform_layout(tile, ("write", 0), lambda a, b: (a // 16, b // 16, *ci.accum_16x16_layout(a % 16, b % 16)))

    r, c = sch.get_loops(deq)[-2:]
    r0, r1 = sch.split(r, [None, 16])
    c0, c1 = sch.split(c, [None, 16])
    sch.reorder(r0, c0, r1, c1)
    # accumulators stay in registers only if every index into them is a constant after unrolling; TIR's own
    # unrolling would leave LowerWarpMemory indices it cannot simplify, so nvcc unrolls (#pragma unroll)
    for loop in (r0, c0):
        sch.unroll(loop)
        sch.annotate(loop, "pragma_unroll_explicit", 0)

    sch.decompose_reduction(tile, k0)
    init = sch.get_sblock("acc_init")
    sch.tensorize(sch.split(sch.get_loops(init)[-2], [None, 16])[1], ensure(ci.FILL))
    sch.tensorize(r1, ensure(ci.store_dequant_name(cfg.epilogue)))
    sch.tensorize(sch.get_loops(sch.get_sblock("acc"))[-3], ensure(ci.mma_decode_name(wm // 16, scope)))
    sch.tensorize(sch.get_loops(a_w)[-2], ensure(ci.ldmatrix_a_name(scope)))

    # pipeline: k0 runs [q fill, packed fill, (k1 prologue, body, epilogue)]; fills are async
    last = knobs.stages - 1
    sch.annotate(k0, "software_pipeline_stage", [0, 0, last, last, last])
    sch.annotate(k0, "software_pipeline_order", [0, 1, 2, 3, 4])
    sch.annotate(k0, "software_pipeline_async_stages", [0])
    sch.annotate(k1, "software_pipeline_stage", [0, 1])
    sch.annotate(k1, "software_pipeline_order", [0, 1])


def cuda_source(func, spec) -> str:
    """CUDA C++ of a scheduled PrimFunc for TargetSpec `spec` (cp.async enabled), kernel named w2a8_kernel."""
    import tvm

    mod = tvm.IRModule({"w2a8": func.with_attr("global_symbol", "w2a8")})
    with tvm.transform.PassContext(config={"tirx.use_async_copy": True}):
        ex = tvm.compile(mod, target=spec.target())
    return ex.mod.imports[0].inspect_source("cuda")


def kernel_report(cfg: W2A8Config, spec, knobs: W2A8CudaKnobs | None = None) -> dict:
    """Compile the kernel for CUDA TargetSpec `spec` with the pip toolchain (targets/cuda_toolchain.py) and
    report ptxas resources and SASS opcode counts (for tests; bmvcc/report.py has the roofline model)."""
    from ..targets import cuda_toolchain

    knobs = knobs or default_knobs(cfg)
    func = schedule(tc_compute(padded(cfg, knobs)), spec.target(), knobs)
    cubin = cuda_toolchain.compile_cuda(cuda_source(func, spec), spec.facts["arch"])
    (res,) = cubin.resources
    return {"config": cfg, "knobs": knobs, "padded": padded(cfg, knobs), "resources": res,
            "sass": cubin.opcode_counts()}


__all__ = ["DEFAULT", "KERNEL_ATTR", "SMALL_M", "TC_LAYOUT", "W2A8CudaKnobs", "cuda_source", "default_knobs",
           "estimated_registers", "kernel_report", "pad_operands", "padded", "schedule", "space", "tc_compute",
           "tc_order", "tc_pack", "tc_relayout", "tuning_knobs"]
