"""The warp-instructions a GPU artifact's kernels execute, counted by running their PTX (bmvcc report's issue time).

Each kernel launch of each PrimFunc the artifact launches (device.json) runs in the emulator on random inputs
(verify's), the CTAs of its grid sampled as verify samples them (all of a grid of at most `max_ctas`). The count is
of PTX instructions (a predicated-off one counts, a divergent warp counts both sides) and exact for the CTAs run;
per CTA it is their mean, exact for the grid when every CTA takes the same path or the whole grid ran.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .launches import KernelLaunch
from .machine import EmulationError, GlobalMemory, Launch, run_kernel
from .parse import parse_ptx
from .verify import random_arguments, sample_ctas


def executed(outdir: Path, max_ctas: int = 8, seed: int = 0) -> dict[str, list[dict] | str]:
    """{PrimFunc name: per kernel launch {"kernel", "ctas_run", "warp_instructions_per_cta"}, or why the emulator
    cannot run it} for the artifact in `outdir` (a GPU build whose files were checked)."""
    import tvm

    from .. import artifact

    outdir = Path(outdir)
    kernels = parse_ptx((outdir / artifact.DEVICE_PTX).read_text())
    definitions = tvm.ir.load_json((outdir / artifact.DEVICE_DEFINITIONS).read_text())
    launches = json.loads((outdir / artifact.DEVICE_INFO).read_text())["launches"]
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
                res = run_kernel(kernels[launch.kernel], Launch(launch.kernel, launch.grid, launch.block,
                                                                [arrays[a] for a in launch.args], launch.dynamic_shared),
                                 ctas=sample_ctas(launch.grid, max_ctas), memory=memory)
                rows.append({"kernel": launch.kernel, "ctas_run": res.ctas_run,
                             "warp_instructions_per_cta": res.warp_instructions / res.ctas_run})
            counts[name] = rows
        except EmulationError as e:
            counts[name] = str(e)
    return counts
