"""Intel AMX (AMX-TILE, AMX-INT8) as TIR calls: the only forms in which bmvcc's CPU kernels use it, so that
the AMX emulator (bmvcc/amx_emulator.py) can give each its documented meaning on any CPU.

State: eight tile registers tmm0..tmm7, each up to MAX_ROWS rows of up to MAX_COLSB bytes, shaped by a
64-byte tile configuration loaded with ldtilecfg (palette 1). Configuration bytes (Intel SDM, LDTILECFG):
    [0] palette = 1, [1] start_row = 0, [2:16] zero,
    [COLSB_AT + 2t : COLSB_AT + 2t + 2] colsb of tile t (bytes per row, uint16 little-endian), t < 8, rest zero,
    [ROWS_AT + t] rows of tile t, t < 8, rest zero (COLSB_AT = 16, ROWS_AT = 48).
Palette 0 releases the state (as tilerelease); a palette above 1 raises #GP.
tdpbssd c, a, b (int8 x int8 -> int32): for m < rows(c), n < colsb(c) / 4:
    c[m, n] += sum_{k < colsb(a) / 4} sum_{i < 4} int32(a[m, 4k + i]) * int32(b[k, 4n + i])
so b holds 4 consecutive k of each output column n side by side (the "VNNI" layout [k // 4, n, k % 4]).
tileloadd / tilestored move rows(t) rows of colsb(t) bytes, row r at address `ptr + r * stride` (bytes).

Linux grants a process the tile data state only on request (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA);
before that an AMX instruction raises SIGILL. Each kernel requests it itself (`request_permission`, an
idempotent syscall returning 0 once granted), so a module runs under the plain TVM runtime.
"""

from __future__ import annotations

TILES = 8
MAX_ROWS, MAX_COLSB = 16, 64
CONFIG_BYTES = 64
PALETTE = 1
COLSB_AT, ROWS_AT = 16, 48  # configuration bytes where the tiles' colsb (2 bytes each) and rows (1 byte) start

# x86-64 Linux: syscall number of arch_prctl, its codes, and the XTILEDATA state component.
SYS_ARCH_PRCTL = 158
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18


def config_bytes(shapes: dict[int, tuple[int, int]]) -> list[int]:
    """The 64 configuration bytes for tiles {t: (rows, colsb)}; the tiles not named are unused (0 x 0)."""
    cfg = [0] * CONFIG_BYTES
    cfg[0] = PALETTE
    for t, (rows, colsb) in shapes.items():
        if not (0 <= t < TILES and 0 < rows <= MAX_ROWS and 0 < colsb <= MAX_COLSB):
            raise ValueError(f"tile {t}: {rows} x {colsb} B is not a palette-1 tile")
        cfg[COLSB_AT + 2 * t], cfg[COLSB_AT + 2 * t + 1] = colsb & 0xFF, colsb >> 8
        cfg[ROWS_AT + t] = rows
    return cfg


def _intrin(name: str, *args):
    from tvm import tirx

    return tirx.call_llvm_intrin("void", f"llvm.x86.{name}", *args)


def _tile(t: int):
    from tvm import tirx

    if not 0 <= t < TILES:
        raise ValueError(f"tmm{t} does not exist")
    return tirx.const(t, "uint8")


def _stride(stride):
    from tvm import tirx

    return tirx.const(stride, "int64") if isinstance(stride, int) else tirx.Cast("int64", stride)


def ldtilecfg(ptr):
    """Load the tile configuration from 64 bytes at `ptr`."""
    return _intrin("ldtilecfg", ptr)


def tilezero(t: int):
    return _intrin("tilezero", _tile(t))


def tileloadd(t: int, ptr, stride):
    """tmm[t] <- rows(t) rows of colsb(t) bytes, row r at ptr + r * stride bytes."""
    return _intrin("tileloadd64", _tile(t), ptr, _stride(stride))


def tilestored(t: int, ptr, stride):
    """rows(t) rows of colsb(t) bytes of tmm[t] -> ptr + r * stride bytes."""
    return _intrin("tilestored64", _tile(t), ptr, _stride(stride))


def tdpbssd(c: int, a: int, b: int):
    """tmm[c] += tmm[a] . tmm[b] on signed int8 groups of 4 (module docstring)."""
    return _intrin("tdpbssd", _tile(c), _tile(a), _tile(b))


def tilerelease():
    """Return the tile state to its initial (unconfigured) form."""
    return _intrin("tilerelease")


def request_permission():
    """int64 expression: arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA); 0 when the process may use AMX."""
    from tvm import tirx

    return tirx.call_extern("int64", "syscall", tirx.const(SYS_ARCH_PRCTL, "int64"),
                            tirx.const(ARCH_REQ_XCOMP_PERM, "int64"), tirx.const(XFEATURE_XTILEDATA, "int64"))
