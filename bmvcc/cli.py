"""The `bmvcc` command line. Every user mistake ends in one line on stderr and exit status 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import BmvccError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compile ternary-weight BitMedViT models into Apache TVM modules.")


def _progress(msg: str) -> None:
    typer.echo(f"[bmvcc] {msg}", err=True)


@app.command()
def compile(
    source: Path = typer.Argument(..., help="BitMedViT state dict (.pth) or torch.export program (.pt2)"),
    output: Path = typer.Option(..., "-o", "--output", help="artifact directory to write"),
    target: str = typer.Option("host", "--target", "-t", help="compile target (bmvcc targets lists them)"),
    batch: int = typer.Option(1, "--batch", help="static batch size of the compiled module"),
    heads: Optional[int] = typer.Option(None, "--heads", help="attention heads (needed for multi-head checkpoints)"),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="input image size (checked against the checkpoint)"),
    no_bitlinear: bool = typer.Option(False, "--no-bitlinear", help="keep BitLinear layers as float matmuls"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="allow a checkpoint that runs pickled code (only for files you trust)"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="MedMNIST data set the model was trained on (label names for predict and eval)"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
):
    """Compile a checkpoint into an artifact directory (module .so, weights, metadata.json)."""
    from .driver import CompileOptions, compile_model

    options = CompileOptions(target=target, batch=batch, heads=heads, image_size=image_size,
                             trust_pickle=trust_pickle, bitlinear=not no_bitlinear, dataset=dataset)
    report = compile_model(source, output, options, progress=_progress)
    summary = {"output": str(report.outdir), "seconds": round(report.seconds, 2), **report.metadata["passes"]}
    typer.echo(json.dumps(summary, indent=2) if as_json else f"compiled {source} -> {report.outdir} in {report.seconds:.1f} s")


@app.command()
def run(
    outdir: Path = typer.Argument(..., help="artifact directory from bmvcc compile"),
    input: Path = typer.Option(..., "--input", "-i", help=".npy float32 images, NCHW (or one CHW image)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="save logits to this .npy instead of printing"),
):
    """Run a compiled artifact on images with the TVM runtime and print or save the logits."""
    import numpy as np

    from .runtime import load, load_npy

    model = load(outdir)
    logits = model(load_npy(input))
    if output is None:
        np.set_printoptions(precision=5, suppress=True, linewidth=120)
        typer.echo(str(logits))
    else:
        np.save(output, logits)
        typer.echo(f"saved logits {logits.shape} to {output}")


@app.command()
def targets():
    """List the compile targets, one per line."""
    from .targets import get, names

    for name in names():
        typer.echo(get(name).summary())


def main(argv: Optional[List[str]] = None) -> None:
    try:
        app(args=argv, standalone_mode=False)
    except BmvccError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(130)
    except Exception as e:  # click's usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
