"""The issue time of `bmvcc report` (bmvcc/ptx/issue.py, bmvcc/report.py) on tiny hand-made inputs: the
warp-instructions the emulator executes per PTX instruction, the SASS per warp derived from them loop by loop
(hand-written nvdisasm text whose executions are counted by hand), occupancy and rounds of resident CTAs."""

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


@pytest.mark.parametrize("threads, registers, shared, ctas, limit", [
    (256, 64, 0, 4, "registers"),  # 8 warps x 2048 registers: 4 CTAs in 64 K
    (128, 255, 0, 2, "registers"),  # 255 x 32 rounds up to 8192 per warp
    (128, 32, 40 * 1024, 4, "shared memory"),  # 41 KB + 1 KB reserved per CTA in 164 KB
    (1024, 8, 0, 1, "threads"),  # 1536 threads per SM
    (32, 16, 0, 16, "blocks"),  # 16 resident blocks per SM
])
def test_occupancy_on_orin_follows_the_cuda_occupancy_rules(threads, registers, shared, ctas, limit):
    """sm_87's resident CTAs as the CUDA Occupancy Calculator counts them (its allocation units and limits)."""
    from bmvcc.report import occupancy
    from bmvcc.targets import get

    occ = occupancy(threads, registers, shared, get("jetson-orin-nano").facts)
    assert (occ["ctas_per_sm"], occ["limit"], occ["warps_per_cta"]) == (ctas, limit, -(-threads // 32))


def test_issue_time_runs_the_busiest_sm_in_rounds_of_resident_ctas():
    """64 CTAs of 8 warps on 8 SMs holding 6 CTAs each: the busiest SM runs 8 CTAs, 6 then 2; a scheduler issues
    for 12 warps, then for 4, 100 instructions each, at 625 MHz. A single 1-warp CTA: its 100 instructions."""
    from bmvcc.report import issue_seconds
    from bmvcc.targets import get

    facts = get("jetson-orin-nano").facts
    occ = {"ctas_per_sm": 6, "warps_per_cta": 8}
    assert issue_seconds(100, 64, occ, facts) == pytest.approx((12 + 4) * 100 / 625e6)
    assert issue_seconds(100, 1, {"ctas_per_sm": 16, "warps_per_cta": 1}, facts) == pytest.approx(100 / 625e6)
