"""The `bmvcc` command line. Every user mistake ends in one line on stderr and exit status 2."""

from __future__ import annotations

import json
import signal
import sys
import traceback
from pathlib import Path
from typing import List, Optional

import typer

from . import scratch
from .errors import BmvccError, InternalError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compile ternary-weight BitMedViT models into Apache TVM modules.")


def _progress(msg: str) -> None:
    typer.echo(f"[bmvcc] {msg}", err=True)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"bmvcc {version('bmvcc')}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                          help="print the version and exit")) -> None:
    """Options that come before the command (--version)."""


@app.command()
def compile(
    source: Path = typer.Argument(..., help="BitMedViT state dict (.pth), torch.export program (.pt2) or ONNX model (.onnx)"),
    output: Path = typer.Option(..., "-o", "--output", help="artifact directory to write"),
    target: str = typer.Option("host", "--target", "-t", help="compile target (bmvcc targets lists them)"),
    batch: Optional[int] = typer.Option(None, "--batch", min=1, help="static batch size of the compiled module (default 1, or an ONNX model's own)"),
    heads: Optional[int] = typer.Option(None, "--heads", min=1, help="attention heads (needed for multi-head checkpoints)"),
    image_size: Optional[int] = typer.Option(None, "--image-size", min=1, help="input image size (checked against the checkpoint)"),
    no_bitlinear: bool = typer.Option(False, "--no-bitlinear", help="keep BitLinear layers as float matmuls"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="allow a checkpoint that runs pickled code (only for files you trust)"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="MedMNIST data set the model was trained on (label names for predict and eval)"),
    db: Optional[Path] = typer.Option(None, "--db", help="tuning database from bmvcc tune (same target) to apply"),
    force: bool = typer.Option(False, "--force", help="replace OUTDIR even if it is not a bmvcc artifact (its files are deleted)"),
    dump_ir: Optional[Path] = typer.Option(None, "--dump-ir", help="write the IR after every pass and build stage to this directory (TVMScript)"),
    float_precision: str = typer.Option("float32", "--float-precision", help="float32 (default), or bf16: the Linear layers' matmuls and causal attention on bf16 operands (CPUs with AVX-512 BF16)"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
):
    """Compile a checkpoint into an artifact directory (module .so, weights, metadata.json)."""
    from .driver import CompileOptions, compile_model

    options = CompileOptions(target=target, batch=batch, heads=heads, image_size=image_size,
                             trust_pickle=trust_pickle, bitlinear=not no_bitlinear, dataset=dataset, db=db,
                             force=force, dump_ir=dump_ir, float_precision=float_precision,
                             measure_float32_error=True)
    report = compile_model(source, output, options, progress=_progress)
    summary = {"output": str(report.outdir), "seconds": round(report.seconds, 2), **report.metadata["passes"],
               "kernels_from_db": report.metadata["tuning"]["kernels_from_db"],
               "float_precision": float_precision, "float32_error": report.float32_error}
    tuning = report.metadata["tuning"]
    source_db = f"shipped database {tuning['db']}" if tuning["shipped"] else tuning["db"]
    tuned = f" ({tuning['kernels_from_db']} kernels from {source_db})" if tuning["db"] else ""
    typer.echo(json.dumps(summary, indent=2) if as_json else f"compiled {source} -> {report.outdir} in {report.seconds:.1f} s{tuned}")
    if not as_json:
        from .passes.pipeline import describe

        typer.echo(describe(report.metadata["passes"]))
        if float_precision != "float32":
            from .precision import describe as describe_precision

            typer.echo(describe_precision(float_precision, report.metadata["passes"], report.float32_error))


@app.command()
def run(
    outdir: Path = typer.Argument(..., help="artifact directory from bmvcc compile"),
    input: Path = typer.Option(..., "--input", "-i", help=".npy float32 images, NCHW (or one CHW image)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="save logits to this .npy instead of printing"),
):
    """Run a compiled artifact on images with the TVM runtime and print or save the logits."""
    import numpy as np

    from .artifact import check_output_file, read_metadata, write_error
    from .runtime import load, load_npy

    if output is not None:
        if output.suffix != ".npy":
            raise BmvccError(f"output '{output}' must end in .npy (numpy.save adds .npy to any other name); "
                             "e.g. -o logits.npy")
        check_output_file(output)
    read_metadata(outdir)  # the artifact and the input checked before loading the runtime (seconds)
    images = load_npy(input)
    logits = load(outdir)(images)
    if output is None:
        typer.echo(_logits_table(logits))
    else:
        try:
            np.save(output, logits)
        except OSError as e:
            raise write_error(e, output) from None
        typer.echo(f"saved logits {logits.shape} to {output}")


def _logits_table(logits) -> str:
    """One row per image: the winning class, its logit and its margin over the runner-up."""
    import numpy as np

    ranked = -np.sort(-logits, axis=1)
    second = min(1, logits.shape[1] - 1)
    rows = [f"{'image':>5}  {'argmax':>6}  {'logit':>9}  {'margin':>9}"]
    rows += [f"{i:>5}  {c:>6}  {r[0]:>9.4f}  {r[0] - r[second]:>9.4f}"
             for i, (c, r) in enumerate(zip(logits.argmax(1), ranked))]
    return "\n".join(rows + [f"logits {logits.shape}: save them all with -o FILE.npy"])


@app.command("eval")
def eval_(
    outdir: Path = typer.Argument(..., help="artifact directory from bmvcc compile"),
    dataset: str = typer.Option(..., "--dataset", help="MedMNIST 2D data set (flag), e.g. pathmnist"),
    data_dir: Path = typer.Option(..., "--data-dir", help="folder with MedMNIST's {flag}.npz / {flag}_{size}.npz (never downloaded)"),
    split: str = typer.Option("test", "--split", help="train, val or test"),
    size: Optional[int] = typer.Option(None, "--size", help="MedMNIST image size of the file to read (default: the model's)"),
    ckpt: Optional[Path] = typer.Option(None, "--ckpt", help="also evaluate this PyTorch checkpoint and compare predictions"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
):
    """ACC and AUC on a MedMNIST split with medmnist's Evaluator (with --ckpt: against the PyTorch reference)."""
    from functools import partial

    from .evaluation import evaluate

    result = evaluate(outdir, dataset, data_dir, split=split, size=size, ckpt=ckpt,
                      progress=partial(typer.progressbar, file=sys.stderr))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"{result['dataset']} {result['split']} ({result['images']} images, size {result['size']}): "
               f"ACC {result['acc']:.4f}  AUC {result['auc']:.4f}")
    ref = result.get("reference")
    if ref:
        typer.echo(f"PyTorch reference: ACC {ref['acc']:.4f}  AUC {ref['auc']:.4f}  identical predictions "
                   f"{ref['agreement']:.4f}  max |logit diff| {ref['max_abs_logit_diff']:.2e}")


@app.command()
def predict(
    outdir: Path = typer.Argument(..., help="artifact directory from bmvcc compile"),
    images: List[Path] = typer.Argument(..., help="PNG, JPEG or .npy images"),
    top: int = typer.Option(3, "--top", help="how many classes to show per image"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
):
    """Top classes with probabilities for each image (label names when compiled with --dataset)."""
    from .predict import format_text, predict as run_predict

    results = run_predict(outdir, images, top=top)
    typer.echo(json.dumps(results, indent=2) if as_json else format_text(results))


@app.command()
def bench(
    outdir: Path = typer.Argument(..., help="artifact directory from bmvcc compile"),
    repeat: int = typer.Option(50, "--repeat", help="timed runs (one call each, after one warm-up)"),
    rpc_tracker: Optional[str] = typer.Option(None, "--rpc-tracker", help="HOST:PORT of a TVM RPC tracker: bench on a remote device"),
    rpc_key: Optional[str] = typer.Option(None, "--rpc-key", help="device key registered with the tracker"),
    profile: bool = typer.Option(False, "--profile", help="also each kernel's share of one call (ms, %, GB/s, GOP/s vs the CPU's peak)"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="with --profile: also draw the measured kernels as a roofline chart and a bar of where the time goes (.png, .svg or .pdf)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
):
    """Latency (min, p50, p90) and throughput on this machine or on a device over TVM RPC."""
    if plot is not None:
        from .roofline_plot import check_plot_path

        if not profile:
            raise BmvccError("--plot draws the per-kernel profile; pass --profile with it")
        plot = check_plot_path(plot)
    from . import bench as bn

    result = bn.bench(outdir, repeat=repeat, tracker=rpc_tracker, key=rpc_key, profile=profile)
    _show_with_plot(result, as_json, bn.format_text, plot, bn.plot)


@app.command()
def tune(
    source: Path = typer.Argument(..., help="BitMedViT state dict (.pth) or torch.export program (.pt2)"),
    db: Path = typer.Option(..., "--db", help="tuning database directory (created; rerun with the same one to resume)"),
    target: str = typer.Option("host", "--target", "-t", help="target to tune for (bmvcc targets lists them)"),
    trials: int = typer.Option(64, "--trials", help="measured candidates per task on average (budget: trials x tasks), counted over all runs into --db"),
    rpc_tracker: Optional[str] = typer.Option(None, "--rpc-tracker", help="HOST:PORT of a TVM RPC tracker (remote devices)"),
    rpc_key: Optional[str] = typer.Option(None, "--rpc-key", help="device key registered at the tracker"),
    task: List[str] = typer.Option([], "--task", help="tune exactly this task (repeatable; default: the kernels worth tuning)"),
    per_round: int = typer.Option(8, "--per-round", help="candidates built and measured per search round (saved after each)"),
    batch: int = typer.Option(1, "--batch", min=1, help="static batch size (as for bmvcc compile)"),
    heads: Optional[int] = typer.Option(None, "--heads", min=1, help="attention heads (needed for multi-head checkpoints)"),
    image_size: Optional[int] = typer.Option(None, "--image-size", min=1, help="input image size (checked against the checkpoint)"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="allow a checkpoint that runs pickled code (only for files you trust)"),
    seed: int = typer.Option(0, "--seed", help="search seed"),
    as_json: bool = typer.Option(False, "--json", help="print the per-task results as JSON"),
):
    """Tune the model's kernels with MetaSchedule and record the results in a database for compile --db."""
    from .tune import TuneOptions, tune_model

    options = TuneOptions(target=target, trials=trials, batch=batch, heads=heads, image_size=image_size,
                          trust_pickle=trust_pickle, rpc_tracker=rpc_tracker, rpc_key=rpc_key, tasks=tuple(task),
                          per_round=per_round, seed=seed)
    report = tune_model(source, db, options, progress=_progress)
    typer.echo(json.dumps(report.to_dict(), indent=2) if as_json else
               f"{report.table()}\ntuned {len(report.tasks)} tasks for {report.target} on {report.devices} "
               f"in {report.seconds:.0f} s; database {report.db} (use: bmvcc compile --db {report.db})")


@app.command()
def inspect(
    outdir: Path = typer.Argument(..., help="artifact directory of a GPU build (bmvcc compile --target jetson-orin-nano)"),
    sass: bool = typer.Option(False, "--sass", help="print the SASS of the device binary (OUTDIR/device.cubin)"),
    as_json: bool = typer.Option(False, "--json", help="print the per-kernel summary as JSON"),
):
    """Show a GPU artifact's device binary: per kernel registers, shared memory, SASS mix; or its SASS."""
    from . import device_summary

    if sass:
        typer.echo(device_summary.sass(outdir))
        return
    s = device_summary.summary(outdir)
    typer.echo(json.dumps(s, indent=2) if as_json else device_summary.format_text(s))


def _show_with_plot(result: dict, as_json: bool, format_text, plot: Optional[Path], draw) -> None:
    """Prints `result` as JSON or as format_text's table, drawn first into `plot` (checked) by draw(result, plot)."""
    if plot is not None:
        draw(result, plot)
    typer.echo(json.dumps(result, indent=2) if as_json else format_text(result))
    if plot is not None and not as_json:
        typer.echo(f"plot: {plot}")


@app.command()
def report(
    outdir: Path = typer.Argument(..., help="artifact directory of a GPU build"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="also draw a roofline chart and a bar of where the time goes into this .png, .svg or .pdf file"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
):
    """Per-kernel work, traffic, resources, occupancy and an estimated time on the target (the largest of tensor-core,
    issue and DRAM time, plus launch overhead; the peak roofline as a lower bound); model total and assumptions."""
    from . import report as rep

    if plot is not None:
        from .roofline_plot import check_plot_path

        plot = check_plot_path(plot)
    _show_with_plot(rep.report(outdir), as_json, rep.format_text, plot, rep.plot)


@app.command()
def verify(
    outdir: Path = typer.Argument(..., help="artifact directory of a GPU build"),
    max_ctas: int = typer.Option(64, "--max-ctas", help="CTAs run per kernel at most (first, last, edge tiles and spread ones)"),
    as_json: bool = typer.Option(False, "--json", help="print the per-kernel results as JSON"),
):
    """Run every GPU kernel the artifact launches through bmvcc's PTX emulator (on the CPU) against its compute
    definition; exit status 1 if one disagrees, races or fails."""
    from .ptx.verify import format_table, verify_artifact

    def bar(done: int, total: int, name: str) -> None:
        filled = 30 * done // max(total, 1)
        typer.echo(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total} {name[:40]:<40}", err=True,
                   nl=done == total)

    rows = verify_artifact(outdir, max_ctas=max_ctas, progress=bar)
    typer.echo(json.dumps(rows, indent=2) if as_json else format_table(rows))
    if any(r["verdict"] != "ok" for r in rows):
        sys.exit(1)


@app.command("export-onnx")
def export_onnx(
    source: Path = typer.Argument(..., help="BitMedViT state dict (.pth)"),
    output: Path = typer.Option(..., "-o", "--output", help="ONNX file to write (.onnx)"),
    batch: Optional[int] = typer.Option(None, "--batch", min=1, help="static batch size (default: a dynamic batch dimension)"),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset, 17 or newer (default 20)"),
    heads: Optional[int] = typer.Option(None, "--heads", min=1, help="attention heads (needed for multi-head checkpoints)"),
    image_size: Optional[int] = typer.Option(None, "--image-size", min=1, help="input image size (checked against the checkpoint)"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="allow a checkpoint that runs pickled code (only for files you trust)"),
    force: bool = typer.Option(False, "--force", help="replace the output file even if bmvcc did not export it"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
):
    """Export the deployment forward (int8 ternary weights) as a standard ONNX model."""
    from .onnx_output import DEFAULT_OPSET, check_request

    check_request(source, output, DEFAULT_OPSET if opset is None else opset, heads, force)  # before importing torch (seconds)
    from .onnx_export import export_checkpoint

    info = export_checkpoint(source, output, batch=batch, opset=opset, heads=heads, image_size=image_size,
                             trust_pickle=trust_pickle, force=force, progress=_progress)
    typer.echo(json.dumps(info, indent=2) if as_json else
               f"exported {source} -> {output} (opset {info['opset']}, {info['bitlinear_layers']} BitLinear layers)")


@app.command()
def targets():
    """List the compile targets, one per line."""
    from .targets import get, names

    for name in names():
        typer.echo(get(name).summary())


class _Interrupted(BaseException):
    """Raised by SIGINT / SIGTERM: unwinds like KeyboardInterrupt, so every staging and temporary
    folder is removed on the way out, but is not turned into an Abort by the command-line parser."""


def main(argv: Optional[List[str]] = None) -> None:
    received: List[str] = []  # the signal, recorded even when TVM turns the exception into its own error

    def interrupt(signum, _frame):
        received.append(signal.Signals(signum).name)
        if len(received) == 1:  # a second signal must not cut short the cleanup the first one started
            raise _Interrupted

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with scratch.process_tempdir():
            app(args=argv, prog_name="bmvcc", standalone_mode=False)
    except BaseException as e:  # noqa: BLE001  sorted below; anything else is re-raised
        if received:
            typer.echo(f"error: interrupted by {received[0]}; unfinished output was removed, run the command again", err=True)
            sys.exit(130)
        if isinstance(e, BmvccError):
            typer.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        if isinstance(e, InternalError):  # a bmvcc bug: the traceback is what its report needs
            traceback.print_exception(e)
            sys.exit(e.exit_code)
        if not isinstance(e, typer.TyperException):  # typer's vendored click ClickException: usage errors
            raise
        message = e.format_message().strip().rstrip(".").replace("\n", " ")
        if not message:  # `bmvcc` without arguments: the help
            e.show()
        else:
            command = e.ctx.command_path if getattr(e, "ctx", None) else "bmvcc"
            typer.echo(f"error: {message[:1].lower()}{message[1:]}; see '{command} --help'", err=True)
        sys.exit(2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    main()
