"""An Intel AMX emulator: `emulate(func)` rewrites the AMX calls of a TIR kernel (schedules/amx.py's forms)
into plain TIR with their documented effect on an emulated tile state, so the kernel builds for any llvm
target and runs on any CPU, to be compared with an independent reference.

`func` is the kernel as written or scheduled (TVMScript, s_tir blocks, tensorized). The emulator lowers it
as far as TVM's s_tir pipeline goes up to FlattenBuffer (`_LOWERING`: blocks, match buffers and
multi-dimensional indices gone) and rewrites that, because there every pointer an AMX call takes is
`address_of(buf[i])` or `tvm_access_ptr(buf.data, offset)` into a flat buffer of the size the real build
allocates (after CompactBufferAllocation; before CSE or StorageRewrite hide or merge them), so accesses
are bounds-checked against the memory the CPU would touch, and the state is plain buffers allocated where
the tasks are. The result is still a kernel for `tvm.tirx.build` / `tvm.compile`, whose pipeline runs those
passes again (nothing is left for them to lower) and then lowers it as it lowers the real one.

State: 64 configuration bytes (as ldtilecfg loaded them; byte 0, the palette, is 0 when unconfigured) and
8 tiles of 16 x 64 bytes, fresh and unconfigured for each iteration of a parallel loop holding AMX calls
(the innermost such loop; calls outside any share the function's). That is stricter than the CPU, where a
thread running several iterations keeps its configuration: a task relying on another's ldtilecfg faults.
Faults are TIR asserts (`AMX fault: ...`) where the CPU would raise #UD or #GP, or touch memory outside the
buffer: a tile instruction without a configuration or on an unconfigured tile, a configuration of a palette
above 1, or of palette 1 with shapes beyond 16 rows x 64 bytes (or a start_row, which only a restarted
tileloadd uses), tdpbssd on tiles whose shapes disagree or that are not three distinct registers, a load,
store or ldtilecfg whose first or last row leaves the buffer its pointer points into (for a
tvm_access_ptr, the extent it covers). ldtilecfg of palette 0 releases the state, as tilerelease.
tdpbssd accumulates in uint32, i.e. int32 with wrap-around as the hardware. A tile's bytes beyond its
configured rows and colsb stay zero, as on the CPU: ldtilecfg zeroes all tiles and no instruction writes
past the shape. The permission request (arch_prctl) becomes 0.

A fault in a parallel task is reliably reported only when task 0 (run by the calling thread) faults too:
TVM's thread pool sometimes drops an error raised in a worker's task. Negative controls make task 0 fault.
"""

from __future__ import annotations

import functools
import operator
import re

import tvm
import tvm_ffi
from tvm import tirx
from tvm.target import codegen

from .schedules import amx

# TVM 0.27's s_tir pipeline (tvm/s_tir/pipeline.py) up to and including FlattenBuffer, in its order.
_LOWERING = ("CanonicalizeLoop", "LowerCrossThreadReduction", "LowerInitBlock",
             "PlanAndUpdateBufferAllocationLocation", "ConvertBlocksToOpaque", "LiftThreadBinding",
             "ManifestSharedMemoryLocalStage", "CompactBufferAllocation", "LowerAutoCopy", "UnifyThreadBinding",
             "LowerMatchBuffer", "StmtSimplify", "InjectPermutedLayout", "AnnotateIrregularLoop",
             "InjectSoftwarePipeline", "TransformMmaBufferLayout", "LowerOpaqueBlock")
# Every AMX intrinsic (tile*, tdp*, tcmm*, tcvt*, tmmul*, t2rp*, tt*, ...): llvm.x86.t* but for TBM, tpause
# and testui, so that one not emulated is refused, not built for the CPU.
_AMX_INTRINSIC = re.compile(r"llvm\.x86\.(ldtilecfg|sttilecfg|t(?!bm\.|pause$|estui$))")
TILE_BYTES = amx.MAX_ROWS * amx.MAX_COLSB


def emulate(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """`func` (TVMScript or scheduled TIR) with every AMX call emulated; raises ValueError for an AMX
    intrinsic or a pointer form the emulator does not know."""
    passes = [getattr(tvm.s_tir.transform, name)() for name in _LOWERING] + [tirx.transform.FlattenBuffer()]
    lowered = tvm.transform.Sequential(passes)(tvm.IRModule({"main": func}))["main"]
    return lowered.with_body(_Rewriter().in_task(lowered.body))


def _is_call(expr, op: str) -> bool:
    return isinstance(expr, tvm.ir.Call) and expr.op.name == op


def _i32(v):
    return tirx.const(v, "int32")


def _u8(v):
    return tirx.const(v, "uint8")


def _loop(name: str, extent, body_of) -> tirx.For:
    var = tirx.Var(name, "int32")
    return tirx.For(var, _i32(0), extent, tirx.ForKind.SERIAL, body_of(var))


def _zero(buffer, start: int, count: int) -> tirx.For:
    return _loop("i", _i32(count), lambda i: tirx.BufferStore(buffer, _u8(0), [start + i]))


def _check(condition, message: str) -> tirx.AssertStmt:
    # condition first: TVM 0.27's constructor takes (condition, kind, message parts), whatever its Python names say
    return tirx.AssertStmt(condition, tvm.ir.StringImm("RuntimeError"), [tvm.ir.StringImm(f"AMX fault: {message}")])


class _Memory:
    """The bytes from a pointer on: the flat buffer it points into and the byte offset in it."""

    def __init__(self, ptr):
        extent = None  # elements from the pointer on that it may reach (tvm_access_ptr's); else to the buffer's end
        if _is_call(ptr, "tirx.address_of") and isinstance(ptr.args[0], tvm.ir.TensorLoad):
            buffer, (index,) = ptr.args[0].source, ptr.args[0].indices
            elem_bytes = buffer.dtype.bits // 8
        elif _is_call(ptr, "tirx.tvm_access_ptr") and _is_call(ptr.args[1], "tirx.buffer_data"):
            buffer, index, extent = ptr.args[1].args[0], ptr.args[2], ptr.args[3]
            elem_bytes = tvm.DataType(str(ptr.args[0].ty)).bits // 8
        else:
            raise ValueError(f"AMX emulator: pointer {ptr} is neither address_of(buf[i]) nor tvm_access_ptr")
        dtype = buffer.dtype
        if len(buffer.shape) != 1 or dtype.lanes != 1 or dtype.bits not in (8, 16, 32, 64) or not (
                isinstance(buffer.elem_offset, tirx.IntImm) and buffer.elem_offset.value == 0):
            raise ValueError(f"AMX emulator: buffer {buffer.name} ({dtype}, shape {buffer.shape}, element offset "
                             f"{buffer.elem_offset}) is not flat memory of whole bytes")
        self.buffer = buffer
        self.item = dtype.bits // 8
        self.start = tirx.Cast("int64", index) * elem_bytes
        self.size = tirx.Cast("int64", self.buffer.shape[0]) * self.item
        # the bytes [low, high) the pointer may reach: its tvm_access_ptr region within the buffer, else the buffer
        self.low, self.high = tirx.const(0, "int64"), self.size
        if extent is not None:
            self.low = tirx.max(self.low, self.start)
            self.high = tirx.min(self.size, self.start + tirx.Cast("int64", extent) * elem_bytes)
        self.extent = extent
        self._uint = f"uint{dtype.bits}"

    def _element(self, offset):
        """(element index, bit shift) of the byte at `offset` from the pointer (little-endian)."""
        at = self.start + tirx.Cast("int64", offset)
        return at // self.item, tirx.Cast(self._uint, (at % self.item) * 8)

    def load(self, offset):
        index, shift = self._element(offset)
        word = tirx.reinterpret(self._uint, tirx.BufferLoad(self.buffer, [index]))
        return tirx.Cast("uint8", word >> shift)

    def store(self, offset, byte) -> tirx.BufferStore:
        index, shift = self._element(offset)
        word = tirx.reinterpret(self._uint, tirx.BufferLoad(self.buffer, [index]))
        mask = tirx.const((1 << self.buffer.dtype.bits) - 1, self._uint) ^ (tirx.const(0xFF, self._uint) << shift)
        word = (word & mask) | (tirx.Cast(self._uint, byte) << shift)
        return tirx.BufferStore(self.buffer, tirx.reinterpret(self.buffer.dtype, word), [index])

    def check_rows(self, what: str, rows, stride, colsb) -> tirx.AssertStmt:
        """The first and last of `rows` rows of `colsb` bytes, `stride` bytes apart, lie in [low, high)."""
        first, last = self.start, self.start + tirx.Cast("int64", rows - 1) * stride
        width = tirx.Cast("int64", colsb)
        inside = tirx.all(first >= self.low, last >= self.low, first + width <= self.high, last + width <= self.high)
        n = self.buffer.shape[0]
        where = self.buffer.name + (f" ({n.value * self.item} B)" if isinstance(n, tirx.IntImm) else "")
        if self.extent is not None:
            where = f"the {self.extent} elements of {where} its tvm_access_ptr covers"
        return _check(inside, f"{what} bytes outside {where} (on the CPU: #GP, a page fault or another buffer's "
                              "bytes)")


class _TileState:
    """One thread's AMX state, as buffers; `used` once an instruction refers to it."""

    def __init__(self):
        self.cfg = tirx.decl_buffer((amx.CONFIG_BYTES,), "uint8", "amx_tilecfg")
        self.tiles = tirx.decl_buffer((amx.TILES * TILE_BYTES,), "uint8", "amx_tiles")
        self.acc = tirx.decl_buffer((1,), "uint32", "amx_acc")
        self.used = False

    def allocation(self) -> list:
        """Allocates the state, unconfigured."""
        return [tirx.AllocBuffer(b) for b in (self.cfg, self.tiles, self.acc)] + [_zero(self.cfg, 0, amx.CONFIG_BYTES)]

    def rows(self, t: int):
        return tirx.Cast("int32", self.cfg[amx.ROWS_AT + t])

    def colsb(self, t: int):
        at = amx.COLSB_AT + 2 * t
        return tirx.Cast("int32", self.cfg[at]) | (tirx.Cast("int32", self.cfg[at + 1]) << 8)

    def byte(self, t: int, row, col) -> tirx.BufferLoad:
        return self.tiles[t * TILE_BYTES + row * amx.MAX_COLSB + col]

    def set_byte(self, t: int, row, col, value) -> tirx.BufferStore:
        return tirx.BufferStore(self.tiles, value, [t * TILE_BYTES + row * amx.MAX_COLSB + col])

    def usable(self, op: str, *tiles: int) -> list:
        """Checks that the state is configured and each of `tiles` has a shape (#UD otherwise)."""
        checks = [_check(self.cfg[0] == _u8(amx.PALETTE),
                         f"{op} without a tile configuration (no ldtilecfg, or released; the CPU raises #UD)")]
        return checks + [_check(self.rows(t) > 0, f"{op}: tmm{t} is not configured (the CPU raises #UD)")
                         for t in tiles]


class _Rewriter:
    """Rewrites a lowered body: AMX calls into emulation on the state of the task they run in."""

    def __init__(self):
        self.states: list[_TileState] = []

    def in_task(self, body):
        """`body` rewritten with a state of its own, allocated at its start when used."""
        self.states.append(_TileState())
        new_body = tvm_ffi.structural_mutate(body, [(tirx.For, self._for), (tirx.Evaluate, self._evaluate),
                                                    (tvm.ir.Call, self._call)])
        state = self.states.pop()
        return tirx.SeqStmt(state.allocation() + [new_body]) if state.used else new_body

    def _for(self, loop, mutator):
        if loop.kind != tirx.ForKind.PARALLEL:
            return mutator.default_mutate(loop)
        return tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind, self.in_task(loop.body),
                        loop.thread_binding, loop.annotations, loop.step)

    @staticmethod
    def _call(call, mutator):
        is_permission = (_is_call(call, "tirx.call_extern") and tvm_ffi.structural_equal(
            call.args, amx.request_permission().args))
        return tirx.const(0, "int64") if is_permission else mutator.default_mutate(call)

    def _evaluate(self, stmt, mutator):
        call = stmt.value
        if not _is_call(call, "tirx.call_llvm_intrin"):
            return mutator.default_mutate(stmt)
        name = codegen.llvm_get_intrinsic_name(int(call.args[0].value))
        if not _AMX_INTRINSIC.match(name):
            return mutator.default_mutate(stmt)
        emulation = getattr(self, "_" + name.removeprefix("llvm.x86."), None)
        if emulation is None:
            raise ValueError(f"AMX emulator: {name} is not emulated (schedules/amx.py lists the forms bmvcc uses)")
        state = self.states[-1]
        state.used = True
        args = [a.value if isinstance(a, tirx.IntImm) and str(a.ty) == "uint8" else a for a in call.args[1:]]
        return tirx.stmt_seq(*emulation(state, *args))

    def _ldtilecfg(self, s: _TileState, ptr) -> list:
        mem = _Memory(ptr)
        n = amx.CONFIG_BYTES
        checks = [_check(s.cfg[0] == _u8(amx.PALETTE), "ldtilecfg: palette above 1 (the CPU raises #GP)"),
                  _check(s.cfg[1] == _u8(0), "ldtilecfg: start_row is not 0 (restarted loads are not emulated)")]
        reserved = [*range(2, amx.COLSB_AT), *range(amx.COLSB_AT + 2 * amx.TILES, amx.ROWS_AT),
                    *range(amx.ROWS_AT + amx.TILES, n)]
        checks += [_check(tirx.all(*[s.cfg[i] == _u8(0) for i in reserved]),
                          "ldtilecfg: reserved bytes are not zero (the CPU raises #GP)")]
        for t in range(amx.TILES):
            rows, colsb = s.rows(t), s.colsb(t)
            checks += [_check(tirx.all(rows <= amx.MAX_ROWS, colsb <= amx.MAX_COLSB),
                              f"ldtilecfg: tmm{t} exceeds {amx.MAX_ROWS} rows x {amx.MAX_COLSB} bytes "
                              "(the CPU raises #GP)"),
                       _check(tirx.any(tirx.all(rows == 0, colsb == 0), tirx.all(rows > 0, colsb > 0)),
                              f"ldtilecfg: tmm{t} has rows or colsb 0, not both (the CPU raises #GP)")]
        return [mem.check_rows("ldtilecfg reads", 1, 0, n),
                _loop("i", _i32(n), lambda i: tirx.BufferStore(s.cfg, mem.load(i), [i])),
                # palette 0: the other bytes unchecked, the state released (configuration all zero)
                tirx.IfThenElse(s.cfg[0] == _u8(0), _zero(s.cfg, 0, n), tirx.stmt_seq(*checks)),
                _zero(s.tiles, 0, amx.TILES * TILE_BYTES)]

    @staticmethod
    def _tilerelease(s: _TileState) -> list:
        return [_zero(s.cfg, 0, amx.CONFIG_BYTES)]

    @staticmethod
    def _tilezero(s: _TileState, t: int) -> list:
        return s.usable(f"tilezero tmm{t}", t) + [_zero(s.tiles, t * TILE_BYTES, TILE_BYTES)]

    def _tileloadd64(self, s: _TileState, t: int, ptr, stride) -> list:
        mem = _Memory(ptr)
        return s.usable(f"tileloadd tmm{t}", t) + [
            mem.check_rows(f"tileloadd tmm{t} reads", s.rows(t), stride, s.colsb(t)),
            _loop("r", s.rows(t), lambda r: _loop("c", s.colsb(t), lambda c: s.set_byte(
                t, r, c, mem.load(tirx.Cast("int64", r) * stride + tirx.Cast("int64", c)))))]

    def _tilestored64(self, s: _TileState, t: int, ptr, stride) -> list:
        mem = _Memory(ptr)
        return s.usable(f"tilestored tmm{t}", t) + [
            mem.check_rows(f"tilestored tmm{t} writes", s.rows(t), stride, s.colsb(t)),
            _loop("r", s.rows(t), lambda r: _loop("c", s.colsb(t), lambda c: mem.store(
                tirx.Cast("int64", r) * stride + tirx.Cast("int64", c), s.byte(t, r, c))))]

    @staticmethod
    def _tdpbssd(s: _TileState, c: int, a: int, b: int) -> list:
        op = f"tdpbssd tmm{c}, tmm{a}, tmm{b}"
        same = [] if len({a, b, c}) == 3 else [
            _check(tirx.const(False), f"{op}: the tiles are not distinct (the CPU raises #UD)")]
        checks = same + s.usable(op, c, a, b) + [
            _check(tirx.all(s.rows(c) == s.rows(a), s.colsb(c) == s.colsb(b), s.colsb(c) % 4 == 0,
                            s.colsb(a) == 4 * s.rows(b)),
                   f"{op}: shapes disagree (rows(c) == rows(a), colsb(c) == colsb(b) a multiple of 4, "
                   "colsb(a) == 4 rows(b) required; the CPU raises #UD)")]

        def signed(t, row, col):
            return tirx.Cast("int32", tirx.reinterpret("int8", s.byte(t, row, col)))

        def add_group(m, n, k):  # acc += a[m, 4k : 4k + 4] . b[k, 4n : 4n + 4], modulo 2^32
            terms = [tirx.Cast("uint32", signed(a, m, 4 * k + i) * signed(b, k, 4 * n + i)) for i in range(4)]
            return tirx.BufferStore(s.acc, functools.reduce(operator.add, terms, s.acc[0]), [0])

        def element(m, n):  # the int32 c[m, n]: bytes 4n .. 4n + 3 of row m, little-endian
            shifts = [tirx.const(8 * i, "uint32") for i in range(4)]
            c_in = [tirx.Cast("uint32", s.byte(c, m, 4 * n + i)) << shifts[i] for i in range(4)]
            c_out = [s.set_byte(c, m, 4 * n + i, tirx.Cast("uint8", s.acc[0] >> shifts[i])) for i in range(4)]
            return tirx.SeqStmt([tirx.BufferStore(s.acc, functools.reduce(operator.or_, c_in), [0]),
                                 _loop("k", s.colsb(a) // 4, lambda k: add_group(m, n, k)), *c_out])

        return checks + [_loop("m", s.rows(c), lambda m: _loop("n", s.colsb(c) // 4, lambda n: element(m, n)))]
