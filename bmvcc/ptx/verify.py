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
    picks = set(list(dict.fromkeys((0, total - 1, gx - 1, gx * (gy - 1), gx * gy * (gz - 1))))[:limit])
    for i in np.linspace(0, total - 1, limit + 2):
        if len(picks) == limit:
            break
        picks.add(int(i))
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


# Agreement of an emulated output with the definition run on the CPU. Integers: exact. Floats: DLight's kernels
# reduce in another order than the definition's serial loops (cross-thread trees, fp16 tensor-core tiles
# accumulated in fp32) and ptxas/llvm may contract a*b+c differently, so each element may differ by a few
# roundings of the reduction's magnitude: |emulated - definition| <= RTOL * |definition| + ATOL * max|definition|.
RTOL = {"float32": 1e-4, "float16": 4e-3}
ATOL = {"float32": 1e-5, "float16": 2e-3}
# A definition's attribute naming the float dtype its results are rounded to when stored in a wider one (attention
# written as float32 for a float32 consumer carries fp16 values): compared with that dtype's tolerance.
PRECISION_ATTR = "bmvcc.precision"


def random_arguments(func, rng) -> list[np.ndarray]:
    """Random contents for every parameter of a PrimFunc (outputs too: an element a kernel fails to write then
    differs from the definition's)."""
    arrays = []
    for p in func.params:
        shape, dtype = tuple(int(d) for d in p.ty.shape), str(p.ty.dtype)
        if dtype.startswith("float"):
            arrays.append(rng.normal(0.0, 1.0, shape).astype(dtype))
        elif dtype == "bool":
            arrays.append(rng.integers(0, 2, shape).astype(bool))
        else:
            info = np.iinfo(dtype)
            arrays.append(rng.integers(max(info.min, -128), min(info.max, 255) + 1, shape).astype(dtype))
    return arrays


def run_definition(func, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """The PrimFunc built for llvm and run on copies of `arrays`; every parameter afterwards."""
    import tvm

    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target="llvm")
    args = [tvm.runtime.tensor(a.copy()) for a in arrays]
    lib["main"](*args)
    return [a.numpy() for a in args]


def compare(emulated: list[np.ndarray], reference: list[np.ndarray], written: list[np.ndarray],
            complete: bool, precision: str | None = None) -> tuple[float, bool]:
    """(max error, agree) over every element (complete run) or the written ones (sampled CTAs); the error of a
    float output is relative to its largest magnitude, of an integer one absolute; `precision`: PRECISION_ATTR's."""
    worst, agree = 0.0, True
    for e, r, w in zip(emulated, reference, written):
        mask = np.ones(e.shape, bool) if complete else w
        if not mask.any():
            continue
        e, r = e[mask], r[mask]
        if e.dtype.kind == "f":
            e64, r64 = e.astype(np.float64), r.astype(np.float64)
            same_nan = np.isnan(e64) & np.isnan(r64)
            diff = np.where(same_nan, 0.0, np.nan_to_num(np.abs(e64 - r64), nan=np.inf))
            finite = np.abs(r64[np.isfinite(r64)])
            scale = float(finite.max()) if finite.size else 1.0
            dtype = precision or str(e.dtype)
            bound = RTOL.get(dtype, 1e-4) * np.abs(r64) + ATOL.get(dtype, 1e-5) * scale
            worst = max(worst, float(diff.max()) / (scale or 1.0))
            agree &= bool(np.all((diff <= bound) | same_nan))
        else:
            diff = np.abs(e.astype(np.int64) - r.astype(np.int64))
            worst = max(worst, float(diff.max()))
            agree &= bool((diff == 0).all())
    return worst, agree


def read_device_files(outdir):
    """(PTX kernels by name, IRModule of the compute definitions, {PrimFunc name: its launches as JSON}) of the GPU
    artifact in `outdir` (Path), whose files were checked."""
    import json

    import tvm

    from .. import artifact
    from .parse import parse_ptx

    return (parse_ptx((outdir / artifact.DEVICE_PTX).read_text()),
            tvm.ir.load_json((outdir / artifact.DEVICE_DEFINITIONS).read_text()),
            json.loads((outdir / artifact.DEVICE_INFO).read_text())["launches"])


def verify_artifact(outdir, max_ctas: int = 64, seed: int = 0, progress=None) -> list[dict]:
    """One row per PrimFunc the artifact launches: kernels, CTAs run / total (of its last launch), max error,
    races, verdict ("ok", "mismatch", "race", or "error: ..." for an emulation error)."""
    from pathlib import Path

    from .. import artifact
    from ..errors import BmvccError
    from .launches import KernelLaunch
    from .machine import EmulationError

    if max_ctas < 1:
        raise BmvccError(f"--max-ctas {max_ctas} runs no CTA; pass 1 or more")
    outdir = Path(outdir)
    meta = artifact.read_metadata(outdir)
    missing = [n for n in (artifact.DEVICE_PTX, artifact.DEVICE_INFO, artifact.DEVICE_DEFINITIONS)
               if not (outdir / n).is_file()]
    if missing:
        raise BmvccError(f"'{outdir}' has no {', '.join(missing)} (target {meta['target']['name']}); bmvcc verify "
                         "checks GPU builds: compile with --target jetson-orin-nano using this bmvcc")
    kernels, definitions, launches = read_device_files(outdir)  # seconds (TVM's import): after the checks
    rng = np.random.default_rng(seed)
    rows = []
    for i, (name, found) in enumerate(sorted(launches.items())):
        if progress:
            progress(i, len(launches), name)
        func = definitions[name]
        arrays = random_arguments(func, rng)
        found = [KernelLaunch.from_json(d) for d in found]
        row = {"primfunc": name, "kernels": [f.kernel for f in found], "ctas_run": 0,
               "ctas_total": int(np.prod(found[-1].grid)) if found else 0, "max_error": None, "races": 0}
        try:
            why = next((w for w in (f.unsupported() for f in found) if w), None)
            if why:
                raise EmulationError(f"{why}; bmvcc verify does not emulate it")
            reference = run_definition(func, arrays)
            res = emulate(kernels, found, arrays, max_ctas=max_ctas)
            err, agree = compare(arrays, reference, res.written, res.ctas_run == res.ctas_total,
                                 func.attrs.get(PRECISION_ATTR))
            row.update(ctas_run=res.ctas_run, max_error=err, races=res.races, race_reports=res.race_reports[:3],
                       verdict="ok" if agree and not res.races else "race" if agree else "mismatch")
        except EmulationError as e:
            row["verdict"] = f"error: {e}"
        rows.append(row)
    if progress:
        progress(len(launches), len(launches), "")
    return rows


def format_table(rows: list[dict]) -> str:
    width = max([len(r["primfunc"]) for r in rows] + [6])
    lines = [f"{'kernel':<{width}}  {'CTAs run':>13}  {'max error':>10}  {'races':>5}  verdict"]
    for r in rows:
        err = "-" if r["max_error"] is None else f"{r['max_error']:.3g}"
        ctas = f"{r['ctas_run']}/{r['ctas_total']}"
        lines.append(f"{r['primfunc']:<{width}}  {ctas:>13}  {err:>10}  {r['races']:>5}  {r['verdict']}")
    bad = sum(r["verdict"] != "ok" for r in rows)
    lines.append(f"{len(rows)} kernels, {sum(r['ctas_run'] for r in rows)} CTAs run: "
                 + ("all agree with their definitions" if not bad else f"{bad} disagree"))
    return "\n".join(lines)


def build_scheduled(scheduled, spec):
    """(PTX kernels, {PrimFunc name: launches}) of an IRModule of scheduled PrimFuncs built for CUDA TargetSpec
    `spec` as the GPU build builds them (cp.async enabled, NVRTC)."""
    import tvm

    from ..targets.cuda_toolchain import cuda_to_ptx
    from .launches import kernel_launches
    from .parse import parse_ptx

    mod = tvm.IRModule({gv.name_hint: f.with_attr("global_symbol", gv.name_hint)
                        for gv, f in scheduled.functions_items()})
    with tvm.transform.PassContext(config={"tirx.use_async_copy": True}):
        ex = tvm.compile(mod, target=spec.target())
    ptx = cuda_to_ptx(ex.mod.imports[0].inspect_source("cuda"), spec.facts["arch"])
    return parse_ptx(ptx), kernel_launches(mod, spec.target())
