"""The instruction counts behind `bmvcc report`'s issue time (bmvcc/ptx/issue.py), on a tiny hand-written kernel:
warp-instructions the emulator executes per PTX instruction, and the SASS per warp derived from them loop by loop
(hand-written nvdisasm text whose executions are counted by hand)."""

from __future__ import annotations

import numpy as np
import pytest

from bmvcc.device_summary import kernel_code
from bmvcc.ptx import Launch, parse_ptx, run_kernel
from bmvcc.ptx.issue import sass_per_warp

# warp w loops w + 2 times (the trip count is uniform in a warp): 4 instructions before the loop, 3 in it, ret
PTX = """.version 8.5
.target sm_87
.address_size 64
.visible .entry k(.param .u64 pa)
{
 .reg .pred %p<2>; .reg .b32 %r<4>;
 mov.u32 %r1, %tid.x;
 shr.u32 %r2, %r1, 5;
 add.s32 %r2, %r2, 2;
 mov.u32 %r3, 0;
LOOP:
 add.s32 %r3, %r3, 1;
 setp.lt.u32 %p1, %r3, %r2;
 @%p1 bra LOOP;
 ret;
}
"""


def _sass(body: str) -> str:
    lines = [f"        /*{16 * i:04x}*/                   {ins} ;" if not ins.endswith(":") else ins
             for i, ins in enumerate(body.strip().splitlines())]
    return '\t.section\t.text.k,"ax",@progbits\n\t.sectioninfo\t@"SHI_REGISTERS=8"\nk:\n.text.k:\n' + "\n".join(lines)


# ptxas's code for it, as nvdisasm prints it: 3 instructions before the loop, 2 in it, EXIT; then a slow path that
# branches back (cold: after the last EXIT), the branch to itself and a NOP
LOOPED = _sass("""
S2R R0, SR_TID.X
LEA.HI R0, R0, 0x2, RZ, 0x1b
MOV R3, RZ
.L_x_0:
IADD3 R3, R3, 0x1, RZ
@P0 BRA `(.L_x_0)
EXIT
.L_x_1:
FFMA R1, R1, R1, R1
BRA `(.L_x_0)
.L_x_2:
BRA `(.L_x_2)
NOP""")
UNROLLED = _sass("\n".join(["IADD3 R3, R3, 0x1, RZ"] * 9 + ["EXIT", ".L_x_2:", "BRA `(.L_x_2)"]))


def _executed():
    kernel = parse_ptx(PTX)["k"]
    res = run_kernel(kernel, Launch("k", (1, 1, 1), (64, 1, 1), [np.zeros(1, np.uint32)]))
    return kernel, res.warp_instructions


def test_emulator_counts_warp_instructions_per_ptx_instruction():
    """2 warps: the 4 instructions before the loop and ret once per warp, the loop's 3 instructions 2 + 3 times."""
    _, counts = _executed()
    np.testing.assert_array_equal(counts, [2, 2, 2, 2, 5, 5, 5, 2])


@pytest.mark.parametrize("sass, per_warp, how", [
    # before the loop and EXIT: 2 x 4 (PTX 2 x 5 x 4/5); the loop: 5 x 2 (PTX 5 x 3 x 2/3); per warp / 2
    (LOOPED, (8 + 10) / 2, "per loop"),
    # no loop left in the SASS: the whole kernel's PTX executions x SASS / PTX size (10 / 8)
    (UNROLLED, (2 * 5 + 5 * 3) * 10 / 8 / 2, "whole kernel"),
])
def test_sass_per_warp_maps_ptx_loops_to_sass_loops(sass, per_warp, how):
    kernel, counts = _executed()
    code = kernel_code(sass)["k"]
    assert sass_per_warp(kernel, counts, 2, code) == (pytest.approx(per_warp), how)
