"""The instructions a GPU artifact's kernels execute (bmvcc report's issue time): PTX counted by running it, SASS
derived from it loop by loop.

`executed`: each kernel launch of each PrimFunc the artifact launches (device.json) runs in the emulator on random
inputs (verify's), the CTAs of its grid sampled as verify samples them (all of a grid of at most `max_ctas`). The
count is per PTX instruction (a predicated-off one counts, a divergent warp counts both sides) and exact for the
CTAs run; per CTA it is their mean, exact for the grid when every CTA takes the same path or the whole grid ran.

`sass_per_warp`: ptxas's SASS has the PTX's loops (trip counts are not readable from the SASS text, the counters
run over byte offsets from registers), but not its instructions one for one. Each loop body and the code outside
every loop is a region; a region's SASS executions are its PTX executions x its SASS / PTX static size. That is
exact for straight-line regions and for loops whose bodies are; when the SASS has other loops than the PTX (ptxas
unrolled or split one) the whole kernel is one region. The SASS after the last EXIT (slow paths) is left out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .launches import KernelLaunch
from .machine import EmulationError, GlobalMemory, Launch, run_kernel
from .verify import random_arguments, read_device_files, sample_ctas


def executed(outdir: Path, max_ctas: int = 8, seed: int = 0) -> dict[str, list[dict] | str]:
    """{PrimFunc name: per kernel launch {"kernel", "ctas_run", "per_instruction": warp-instructions per CTA of each
    PTX instruction}, or why the emulator cannot run it} for the artifact in `outdir` (a GPU build whose files were
    checked)."""
    kernels, definitions, launches = read_device_files(Path(outdir))
    rng = np.random.default_rng(seed)
    counts: dict[str, list[dict] | str] = {}
    for name, found in sorted(launches.items()):
        arrays = random_arguments(definitions[name], rng)
        memory, rows = GlobalMemory(), []
        try:
            for launch in map(KernelLaunch.from_json, found):
                why = launch.unsupported()
                if why:
                    raise EmulationError(why)
                args = [arrays[a] for a in launch.args]
                res = run_kernel(kernels[launch.kernel], Launch(launch.kernel, launch.grid, launch.block, args,
                                                                launch.dynamic_shared),
                                 ctas=sample_ctas(launch.grid, max_ctas), memory=memory)
                rows.append({"kernel": launch.kernel, "ctas_run": res.ctas_run,
                             "per_instruction": res.warp_instructions / res.ctas_run})  # per CTA
            counts[name] = rows
        except EmulationError as e:
            counts[name] = str(e)
    return counts


def loops(branches: list[tuple[int, int]], exits: list[int]) -> list[tuple[int, int]]:
    """(first, last) instruction index of each loop, outer before inner: a branch back to an earlier instruction
    with no unpredicated exit in between. `branches`: (index, target index); `exits`: indices."""
    return sorted(((t, i) for i, t in branches if t <= i and not any(t <= e < i for e in exits)),
                  key=lambda loop: (loop[0], -loop[1]))


def _nesting(found: list[tuple[int, int]]) -> list[int]:
    """Per loop, the loop that contains it (index) or -1."""
    return [max((p for p in range(k) if found[p][0] <= a and b <= found[p][1]), default=-1)
            for k, (a, b) in enumerate(found)]


def _regions(found: list[tuple[int, int]], n: int) -> list[int]:
    """Per instruction index below n: the innermost loop containing it (index in `found`), -1 outside every loop."""
    region = [-1] * n
    for k, (a, b) in enumerate(found):  # an inner loop comes after its outer one: it overwrites
        region[a:min(b + 1, n)] = [k] * (min(b + 1, n) - a)
    return region


def sass_per_warp(kernel, per_instruction, warps: int, sass) -> tuple[float, str]:
    """(SASS instructions each warp executes, "straight-line", "per loop" or "whole kernel") from the PTX `kernel`
    (parse.Kernel), its executed warp-instructions per CTA of each instruction, warps per CTA and its SASS
    (device_summary.SassCode) (module docstring)."""
    instrs = kernel.instrs
    ptx_loops = loops([(i, kernel.labels[ins.operands[0]]) for i, ins in enumerate(instrs)
                       if ins.opcode.split(".")[0] == "bra" and ins.operands[0] in kernel.labels],
                      [i for i, ins in enumerate(instrs) if ins.opcode in ("ret", "exit") and not ins.guard])
    end = sass.hot_end()
    sass_loops = [loop for loop in loops(sass.branches(), [i for i, op in enumerate(sass.opcodes)
                                                           if op == "EXIT" and not sass.guarded[i]]) if loop[1] < end]
    how = "per loop" if ptx_loops else "straight-line"
    if len(ptx_loops) != len(sass_loops) or _nesting(ptx_loops) != _nesting(sass_loops):
        ptx_loops, sass_loops, how = [], [], "whole kernel"
    ptx_region, sass_region = _regions(ptx_loops, len(instrs)), _regions(sass_loops, end)
    total = 0.0
    for r in range(-1, len(ptx_loops)):
        ptx_static = ptx_region.count(r)
        if ptx_static:
            executed = sum(c for c, reg in zip(per_instruction, ptx_region) if reg == r)
            total += executed * sass_region.count(r) / ptx_static
    return total / warps, how
