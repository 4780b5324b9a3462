"""compile: source -> Relax -> bmvcc passes -> TVM build -> artifact directory."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from . import __version__, artifact, precision
from .artifact import sha256
from .data import dataset as medmnist_dataset
from .errors import BmvccError
from .irdump import IRDump
from .sources import check_source
from .targets.base import TargetSpec


@dataclass
class CompileOptions:
    target: str | TargetSpec = "host"  # a registry name (bmvcc targets), or a TargetSpec (e.g. targets.cpu.host(mcpu))
    batch: int | None = None  # None: 1, or an ONNX model's own static batch
    heads: int | None = None
    image_size: int | None = None
    trust_pickle: bool = False
    bitlinear: bool = True  # False: keep BitLinear as float matmuls (for comparison)
    dataset: str | None = None  # MedMNIST flag the model was trained on: label names for predict/eval
    db: Path | None = None  # tuning database directory from bmvcc tune
    shipped_databases: Path | None = None  # where shipped databases are found (None: tunedb.SHIPPED_DATABASES)
    force: bool = False  # replace an existing OUTDIR that is not a bmvcc artifact (artifact.check_outdir)
    dump_ir: Path | None = None  # directory for the IR after every pass and stage (bmvcc/irdump.py)
    float_precision: str = "float32"  # "bf16": the Linear layers' matmuls and causal attention on bf16 operands (bmvcc/precision.py)
    measure_float32_error: bool = False  # a build not in float32 against the PyTorch model (seconds: the CLI's summary)


@dataclass
class CompileReport:
    outdir: Path
    seconds: float
    metadata: dict = field(default_factory=dict)
    float32_error: dict | None = None  # options.measure_float32_error's: precision.error_vs_float32


def compile_model(source_path: Path, outdir: Path, options: CompileOptions,
                  progress: Callable[[str], None] = lambda msg: None) -> CompileReport:
    from .targets import get as get_target

    start = time.perf_counter()
    spec = get_target(options.target)
    artifact.check_outdir(outdir, options.force, source_path)  # fail before minutes of work
    check_source(source_path, options.heads)  # and before the seconds importing torch and TVM take
    precision.check(options.float_precision, spec)
    dataset = medmnist_dataset(options.dataset) if options.dataset else None
    dump = IRDump(options.dump_ir)
    from . import tunedb

    db = options.db
    if db is not None:  # refuse a database of another target before minutes of work
        tunedb.check_target(db, spec)
    else:  # the database shipped for exactly this target, if any
        db = tunedb.shipped_database(spec, options.shipped_databases or tunedb.SHIPPED_DATABASES)
        if db is not None:
            progress(f"using the shipped tuning database {db.name}")
    from . import frontend

    progress(f"loading {source_path}")
    source = frontend.load_source(Path(source_path), heads=options.heads, image_size=options.image_size,
                                  trust_pickle=options.trust_pickle)
    if dataset:
        dataset.check_model(source.input_shape[0], source.num_classes)
    options = replace(options, batch=frontend.resolve_batch(source, options.batch, progress))
    progress("importing into Relax")
    mod = frontend.to_relax(source, options.batch)
    from .passes.pipeline import run_pipeline

    progress(f"running bmvcc passes for {spec.name}")
    mod, weights, pass_report = run_pipeline(mod, spec, bitlinear=options.bitlinear, dump=dump,
                                             float_precision=options.float_precision)
    progress(f"building for {spec.name}: {spec.description}")
    from .build import build

    with artifact.staging(outdir, options.force, source_path) as tmp:
        from_db = build(mod, spec, tmp / artifact.MODULE, progress, db=db, dump=dump)
        _save_weights(weights, tmp / artifact.WEIGHTS)
        metadata = _metadata(source, spec, options, pass_report, weights, dataset)
        metadata["tuning"] = {"db": db.name if db else None,  # the name only: builds record no directory
                              "shipped": db is not None and options.db is None, "kernels_from_db": from_db}
        artifact.write_metadata(tmp, metadata)
    error = None
    if options.measure_float32_error and precision.narrowed(pass_report):  # else the build is float32
        progress(f"measuring the {options.float_precision} build against the float32 model")
        error = precision.error_vs_float32(Path(outdir), source, progress)
    seconds = time.perf_counter() - start
    return CompileReport(Path(outdir), seconds, metadata, error)


def _save_weights(weights, path: Path) -> None:
    import tvm

    tvm.runtime.save_param_dict_to_file({f"w{i}": w for i, w in enumerate(weights)}, str(path))


def _metadata(source, spec, options: CompileOptions, pass_report: dict, weights, dataset) -> dict:
    import tvm

    from .preprocess import REFERENCE
    from .targets import isa

    return {
        "format_version": artifact.FORMAT_VERSION,
        "bmvcc_version": __version__,
        "tvm_version": tvm.__version__,
        "source": {"name": source.path.name, "sha256": sha256(source.path), "kind": source.path.suffix},
        "config": source.config.to_dict() if source.config else None,
        "target": {"name": spec.name, "tvm": spec.tvm_target, "arch": spec.arch, "device": spec.device,
                   "isa": isa.record(spec.tvm_target, spec.arch)},
        "input": {"shape": [options.batch, *source.input_shape], "dtype": "float32", "layout": "NCHW"},
        "num_classes": source.num_classes,
        "preprocessing": REFERENCE,
        "dataset": dataset.to_dict() if dataset else None,
        "num_weights": len(weights),
        "weights": [{"shape": [int(d) for d in w.shape], "dtype": str(w.dtype)} for w in weights],
        "passes": pass_report,
        "float_precision": options.float_precision,
    }


__all__ = ["BmvccError", "CompileOptions", "CompileReport", "compile_model"]
