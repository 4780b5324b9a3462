"""Emulated launches of a PrimFunc's kernels against the PrimFunc's compute definition run on the CPU.

`emulate` runs a PrimFunc's kernel launches (launches.py) on numpy arrays given in the PrimFunc's parameter
order. For a large grid of the last launch it runs a sample of CTAs: the first, the last, the last of each
grid dimension (the edge tiles) and evenly spread ones; earlier launches of the same PrimFunc (which produce
its intermediate buffers) run completely. `written` tells which output elements the CTAs run stored, so a
sampled run is compared on those elements only, and a complete run on every element.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .launches import KernelLaunch
from .machine import GlobalMemory, Launch, run_kernel
from .parse import Kernel


@dataclass
class Emulated:
    ctas_run: int
    ctas_total: int
    races: int
    race_reports: list[str]
    written: list[np.ndarray]  # per array: bool per element, stored by some kernel


def sample_ctas(grid: tuple[int, int, int], limit: int) -> list[tuple[int, int, int]] | None:
    """None (all CTAs) when the grid has at most `limit`; else the first, last, edge and spread CTAs."""
    gx, gy, gz = grid
    total = gx * gy * gz
    if total <= limit:
        return None
    picks = {0, total - 1, gx - 1, gx * (gy - 1), gx * gy * (gz - 1)}
    picks |= {int(i) for i in np.linspace(0, total - 1, max(limit - len(picks), 2))}
    return [(i % gx, i // gx % gy, i // (gx * gy)) for i in sorted(picks)]


def emulate(kernels: dict[str, Kernel], launches: list[KernelLaunch], arrays: list[np.ndarray],
            max_ctas: int | None = None) -> Emulated:
    memory = GlobalMemory()
    run = total = races = 0
    reports: list[str] = []
    for i, launch in enumerate(launches):
        last = i == len(launches) - 1
        ctas = sample_ctas(launch.grid, max_ctas) if last and max_ctas else None
        res = run_kernel(kernels[launch.kernel], Launch(launch.kernel, launch.grid, launch.block,
                                                        [arrays[a] for a in launch.args], launch.dynamic_shared),
                         ctas=ctas, memory=memory)
        if last:
            run, total = res.ctas_run, int(np.prod(launch.grid))
        races += res.races
        reports += res.race_reports
    written = [memory.written.get(id(a), np.zeros(a.nbytes, bool)).reshape(a.size, -1).all(axis=1).reshape(a.shape)
               for a in arrays]
    return Emulated(run, total, races, reports, written)
