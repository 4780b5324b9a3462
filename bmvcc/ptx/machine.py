"""Execution of one PTX kernel over a batch of CTAs in lockstep (PTX ISA 8.5, chapter 4-6 and 9).

Every register is a numpy array over all threads of the batch (CTAs x threads per CTA, each CTA's threads
padded to whole warps of 32 lanes), so one decoded instruction runs every lane of every warp of every CTA
at once; warp-level instructions reshape the thread axis to [warps, 32]. Instructions are decoded once per
kernel into closures `fn(state, mask) -> None | (target, taken)` (mask None: every thread of the batch).

Control flow: threads with the same program counter form a group; the group with the lowest pc runs next
and groups that reach the same pc merge. For the structured code NVRTC emits (forward branches around
if-bodies, backward branches closing loops) this reconverges at the immediate post-dominator.
A group that reaches an instruction that synchronizes threads (`bar.sync`, the warp-wide `.sync` ones,
`activemask`) waits there while another group can still run, and groups waiting at the same one merge: so the
threads meet there as the hardware reconverges them, also where NVRTC lays a loop's latch out before its body
and a branch skips the rest of the body back to it (min-pc scheduling alone would run that group ahead into the
next iteration). `bar.sync` must be reached by every thread of a CTA (or by none of them), at the same
instruction; a thread that exited, before the others reached it or while they wait at it, never arrives.

Memory: `.param` from the launch arguments; `.global` as numpy buffers at distinct addresses with a gap
between them; `.shared` per CTA (static variables, then the dynamic `.extern` array); `.local` per thread.
Every access is bounds-checked: an access outside every buffer raises EmulationError naming the kernel,
PTX line, CTA and thread.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field

import numpy as np

from ..errors import BmvccError
from .parse import Instr, Kernel
from .races import GlobalRaces, SharedRaces

DTYPES = {"b8": np.uint8, "u8": np.uint8, "s8": np.int8, "b16": np.uint16, "u16": np.uint16, "s16": np.int16,
          "f16": np.float16, "b32": np.uint32, "u32": np.uint32, "s32": np.int32, "f32": np.float32,
          "b64": np.uint64, "u64": np.uint64, "s64": np.int64, "f64": np.float64, "pred": np.bool_,
          "f16x2": np.uint32, "bf16": np.uint16, "bf16x2": np.uint32}
_STORAGE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
GLOBAL_BASE = 0x7F00_0000_0000
GLOBAL_GAP = 1 << 20  # unmapped bytes between two global buffers
EXIT = -1


class EmulationError(BmvccError):
    """A kernel did something undefined (out-of-bounds access, divergent barrier, unknown instruction)."""


def storage_dtype(ptx_type: str):
    if ptx_type in ("f32", "f64", "pred"):
        return DTYPES[ptx_type]
    return _STORAGE[np.dtype(DTYPES[ptx_type]).itemsize]


@dataclass
class Buffer:
    base: int
    data: np.ndarray  # uint8 view of the caller's array (writes go through)
    name: str
    written: np.ndarray | None = None  # bool per byte: stored by a kernel


class GlobalMemory:
    """Global buffers at GLOBAL_BASE + ..., each followed by an unmapped gap."""

    def __init__(self):
        self.buffers: list[Buffer] = []
        self.next = GLOBAL_BASE
        self.written: dict[int, np.ndarray] = {}  # id(caller's array) -> bool per byte stored by the kernel

    def add(self, array: np.ndarray, name: str) -> int:
        if not array.flags.c_contiguous:
            raise ValueError(f"global buffer {name} must be C-contiguous")
        base = self.next
        self.buffers.append(Buffer(base, array.reshape(-1).view(np.uint8), name))
        self.written.setdefault(id(array), np.zeros(array.nbytes, bool))
        self.buffers[-1].written = self.written[id(array)]
        self.next = base + -(-max(array.nbytes, 1) // 256) * 256 + GLOBAL_GAP
        return base

    def locate(self, addr: np.ndarray, width: int):
        """(buffer, byte offsets) when every address lies in one buffer with `width` bytes; else None."""
        lo, hi = int(addr.min()), int(addr.max())
        for b in self.buffers:
            if b.base <= lo and hi + width <= b.base + b.data.size:
                return b, (addr - np.uint64(b.base)).astype(np.int64)
        return None


@dataclass
class Ctx:
    """Decode-time facts of a kernel: register numbering and storage, symbols, launch geometry."""

    kernel: Kernel
    reg_index: dict[str, int] = field(default_factory=dict)
    reg_dtype: list = field(default_factory=list)
    shared_offsets: dict[str, int] = field(default_factory=dict)
    local_offsets: dict[str, int] = field(default_factory=dict)
    param_offsets: dict[str, int] = field(default_factory=dict)
    param_bytes: int = 0
    static_shared: int = 0
    local_bytes: int = 0
    syncs: frozenset = frozenset()  # pcs of instructions that synchronize threads (module docstring)


class State:
    """Registers and memories of one batch of CTAs."""

    def __init__(self, ctx: Ctx, ctas: list[tuple[int, int, int]], grid, block, params: np.ndarray,
                 memory: GlobalMemory, dynamic_shared: int, global_races: GlobalRaces):
        bx, by, bz = block
        self.ctx, self.ctas, self.memory, self.params = ctx, ctas, memory, params  # params: the .param bytes
        self.cta_threads = bx * by * bz
        self.padded = -(-self.cta_threads // 32) * 32  # threads per CTA incl. padding lanes
        n = self.n = len(ctas) * self.padded
        t = np.arange(n)
        local = t % self.padded
        self.cta_of = t // self.padded
        self.launched = local < self.cta_threads
        self.alive = self.launched.copy()  # launched and not yet exited (ret / exit)
        self.warp_bit = (np.uint32(1) << (local // 32).astype(np.uint32)).astype(np.uint32)  # the CTA's warp
        self.lane = (local % 32).astype(np.uint32)
        u32 = np.uint32
        cta = np.array(ctas, np.uint32).reshape(-1, 3)[self.cta_of]
        self.special = {"%tid.x": (local % bx).astype(u32), "%tid.y": (local // bx % by).astype(u32),
                        "%tid.z": (local // (bx * by)).astype(u32), "%laneid": self.lane,
                        "%ctaid.x": cta[:, 0].copy(), "%ctaid.y": cta[:, 1].copy(), "%ctaid.z": cta[:, 2].copy()}
        for axis, v in zip("xyz", block):
            self.special[f"%ntid.{axis}"] = np.full(n, v, u32)
        for axis, v in zip("xyz", grid):
            self.special[f"%nctaid.{axis}"] = np.full(n, v, u32)
        self.R = [np.zeros(n, dt) for dt in ctx.reg_dtype]
        self.shared_size = ctx.static_shared + dynamic_shared
        self.shared = np.zeros(len(ctas) * max(self.shared_size, 1), np.uint8)
        self.races = SharedRaces(len(ctas), max(self.shared_size, 1))
        self.local = np.zeros(n * max(ctx.local_bytes, 1), np.uint8)
        self.async_open: list = []  # cp.async copies issued since the last commit_group
        self.async_groups: list[list] = []  # committed groups, oldest first
        self.last_buffer: Buffer | None = None  # the global buffer of the latest global access
        self.global_races = global_races
        linear = np.array([x + grid[0] * (y + grid[1] * z) for x, y, z in ctas], np.int64)
        self.thread_id = linear[self.cta_of] * self.padded + local  # unique in the launch
        self.epoch = np.zeros(len(ctas), np.int64)  # bar.syncs each CTA passed
        self.issued = [0] * len(ctx.kernel.instrs)  # per instruction: the warps with an active thread, summed

    def where(self, line: int, thread: int) -> str:
        """'kernel K, PTX line L, CTA (x, y, z), thread (x, y, z)' of a thread index of the batch."""
        tid = tuple(int(self.special[f"%tid.{a}"][thread]) for a in "xyz")
        return (f"kernel {self.ctx.kernel.name}, PTX line {line}, CTA {tuple(self.ctas[self.cta_of[thread]])}, "
                f"thread {tid}")

    def fail(self, line: int, thread: int, what: str):
        raise EmulationError(f"{what} in {self.where(line, thread)}; this is a bmvcc kernel bug")


def active(st: State, m):
    """Thread indices of the active threads."""
    return np.arange(st.n) if m is None else np.nonzero(m)[0]


def write(st: State, reg: int, value, m) -> None:
    """Register `reg` := value (broadcast, converted to its storage dtype) on active threads."""
    dt = st.ctx.reg_dtype[reg]
    v = np.asarray(value)
    if v.dtype != dt:
        v = v.view(dt) if v.dtype.itemsize == np.dtype(dt).itemsize and v.dtype != np.bool_ else _cast(v, dt)
    if m is None:
        st.R[reg] = np.broadcast_to(v, (st.n,)).copy() if v.ndim == 0 else v
    else:
        st.R[reg] = np.where(m, v, st.R[reg])


def _cast(v: np.ndarray, dt) -> np.ndarray:
    """v into a register of another width: integers zero- or sign-extended (by v's signedness) or truncated."""
    if np.dtype(dt) == np.bool_:
        return v.astype(bool)
    if v.dtype.kind == "f":
        v = v.view(_STORAGE[v.dtype.itemsize])
    return v.astype(dt)


def _warps(mask: np.ndarray) -> int:
    return int(mask.reshape(-1, 32).any(axis=1).sum())


def run_batch(code: list, st: State) -> None:
    """Runs decoded instructions from pc 0 until every thread exited (min-pc group scheduling), counting each
    instruction's warp-instructions in st.issued (a predicated-off instruction issues too; a divergent warp issues
    both sides)."""
    groups: dict[int, np.ndarray] = {0: st.alive.copy()}
    waiting: dict[int, np.ndarray] = {}  # groups at a synchronizing instruction until no other group can run
    syncs = st.ctx.syncs
    while groups or waiting:
        if not groups:  # every group waits: those at one instruction run it together
            groups, waiting = waiting, {}
        pc = min(groups)
        mask = groups.pop(pc)
        m = None if mask.all() else mask
        warps = _warps(mask)
        while True:
            if groups and pc >= min(groups):
                if pc in groups:
                    groups[pc] |= mask
                else:
                    groups[pc] = mask.copy()
                break
            if pc in syncs and any(p not in syncs for p in groups):
                waiting[pc] = waiting[pc] | mask if pc in waiting else mask.copy()
                break
            if pc in waiting:
                mask = mask | waiting.pop(pc)
                m = None if mask.all() else mask
                warps = _warps(mask)
            r = code[pc](st, m)
            st.issued[pc] += warps
            if r is None:
                pc += 1
                continue
            target, taken = r
            if taken is None:
                taken = mask
            elif m is not None:
                taken = taken & mask
            if target == EXIT:
                st.alive &= ~taken
            elif taken.any():
                groups[target] = groups[target] | taken if target in groups else taken.copy()
            mask = mask & ~taken
            if not mask.any():
                break
            m = None if mask.all() else mask
            warps = _warps(mask)
            pc += 1


def _laid_out(variables) -> tuple[dict[str, int], int]:
    """({name: byte offset}, bytes) of (name, alignment, size) variables placed in order, each aligned; a size of
    None (extern shared memory, sized at launch) takes no bytes."""
    offsets, off = {}, 0
    for name, align, size in variables:
        off = -(-off // align) * align
        offsets[name] = off
        off += size or 0
    return offsets, off


def decode(kernel: Kernel) -> tuple[Ctx, list]:
    """Ctx and one closure per instruction; an unknown instruction raises EmulationError naming it."""
    from . import ops_control, ops_float, ops_int, ops_mem, ops_warp, mma  # noqa: F401 (register their ops)
    from .ops import OPS

    ctx = Ctx(kernel)
    for name, typ in kernel.params:
        size = np.dtype(DTYPES[typ]).itemsize
        ctx.param_offsets[name] = -(-ctx.param_bytes // size) * size
        ctx.param_bytes = ctx.param_offsets[name] + size
    for name, typ in kernel.registers.items():
        ctx.reg_index[name] = len(ctx.reg_dtype)
        ctx.reg_dtype.append(storage_dtype(typ))
    ctx.shared_offsets, ctx.static_shared = _laid_out(kernel.shared)
    ctx.local_offsets, ctx.local_bytes = _laid_out(kernel.local)
    parts = [ins.opcode.split(".") for ins in kernel.instrs]
    ctx.syncs = frozenset(pc for pc, p in enumerate(parts) if "sync" in p or p[0] == "activemask")
    code = []
    collect = gc.isenabled()
    gc.disable()  # tens of thousands of closures: the cyclic collector would triple the decode time
    try:
        for ins in kernel.instrs:
            fn = _decode_one(ctx, ins, OPS)
            code.append(_guarded(ctx, ins, fn) if ins.guard else fn)
    finally:
        if collect:
            gc.enable()
    return ctx, code


def _decode_one(ctx: Ctx, ins: Instr, ops: dict):
    parts = ins.opcode.split(".")
    key = next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in ops), None)
    if key is None:
        raise EmulationError(f"the emulator does not know PTX instruction '{ins.opcode}' (kernel "
                             f"{ctx.kernel.name}, PTX line {ins.line}); add it to bmvcc/ptx")
    try:
        return ops[key](ctx, ins, parts)
    except (KeyError, ValueError, IndexError) as e:
        raise EmulationError(f"the emulator cannot decode '{ins}' (kernel {ctx.kernel.name}, PTX line "
                             f"{ins.line}): {e}; add it to bmvcc/ptx") from None


def _guarded(ctx: Ctx, ins: Instr, fn):
    """@%p / @!%p: the instruction runs on the active threads whose predicate holds."""
    p, neg = ctx.reg_index[ins.guard[0]], ins.guard[1]

    def guarded(st, m):
        g = ~st.R[p] if neg else st.R[p]
        if m is not None:
            g = g & m
        if g.all():
            return fn(st, None)
        if not g.any():
            return None
        return fn(st, g)
    return guarded


@dataclass
class Launch:
    """One kernel launch: grid and block (x, y, z), arguments in parameter order (numpy arrays become global
    buffers, written in place; numbers are passed by value), dynamic shared memory bytes."""

    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: list
    dynamic_shared: int = 0


@dataclass
class Result:
    ctas_run: int
    races: int
    race_reports: list[str]
    warp_instructions: np.ndarray  # per PTX instruction, executed by the CTAs run (State.issued)


_DECODED: dict[int, tuple] = {}


def run_kernel(kernel: Kernel, launch: Launch, ctas: list[tuple[int, int, int]] | None = None,
               batch_threads: int = 4096, memory: GlobalMemory | None = None) -> Result:
    """Executes `launch` (all CTAs, or the given ones) in batches of about batch_threads threads; `memory`
    (reused across launches) records which bytes of each argument array the kernel stored."""
    key = id(kernel)
    if key not in _DECODED or _DECODED[key][0] is not kernel:
        _DECODED[key] = (kernel, *decode(kernel))
    _, ctx, code = _DECODED[key]
    memory = memory or GlobalMemory()
    if len(launch.args) != len(kernel.params):
        raise ValueError(f"{kernel.name} takes {len(kernel.params)} arguments, got {len(launch.args)}")
    params = np.zeros(max(ctx.param_bytes, 1), np.uint8)
    for (name, typ), arg in zip(kernel.params, launch.args):
        value = memory.add(arg, name) if isinstance(arg, np.ndarray) else arg
        dt = np.dtype(DTYPES[typ])
        raw = np.array(value, dt if dt.kind == "f" else f"u{dt.itemsize}" if value >= 0 else f"i{dt.itemsize}")
        params[ctx.param_offsets[name]:ctx.param_offsets[name] + dt.itemsize] = raw.reshape(1).view(np.uint8)
    gx, gy, gz = launch.grid
    if ctas is None:
        ctas = [(x, y, z) for z in range(gz) for y in range(gy) for x in range(gx)]
    per_cta = -(-int(np.prod(launch.block)) // 32) * 32
    step = max(1, batch_threads // per_cta)
    races, reports, issued = 0, [], np.zeros(len(kernel.instrs), np.int64)
    global_races = GlobalRaces(per_cta)
    for i in range(0, len(ctas), step):
        st = State(ctx, ctas[i:i + step], launch.grid, launch.block, params, memory, launch.dynamic_shared,
                   global_races)
        run_batch(code, st)
        issued += np.array(st.issued, np.int64)
        races += st.races.count
        reports += st.races.reports[:max(0, 20 - len(reports))]
    return Result(len(ctas), races + global_races.count, reports + global_races.reports[:max(0, 20 - len(reports))],
                  issued)
