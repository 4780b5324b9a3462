"""bmvcc's Relax pipeline: an explicit, ordered list of small named passes.

Each entry is (name, pass); each pass is IRModule -> IRModule and documented in its own file.
"""

from __future__ import annotations

from tvm import relax

from .externalize_weights import externalize_weights


def passes(bitlinear: bool = True) -> list[tuple[str, object]]:
    return [
        # Phase 1: tidy the imported graph
        ("canonicalize_bindings", relax.transform.CanonicalizeBindings()),
        # Phase 2: fold what is known at compile time (weight quantization of float paths)
        ("fold_constants", relax.transform.FoldConstant()),
        ("dead_code_elimination", relax.transform.DeadCodeElimination(["main"])),
    ]


def run_pipeline(mod, spec, bitlinear: bool = True):
    """Returns (module, weights, report): weights are main's parameters after the image."""
    report: dict = {}
    for _name, p in passes(bitlinear):
        mod = p(mod)
    mod, weights = externalize_weights(mod)
    return mod, weights, report
