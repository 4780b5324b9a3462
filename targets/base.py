"""TargetSpec: what a compile target is, for the driver, the schedules and the reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable


@dataclass(frozen=True)
class TargetSpec:
    name: str
    description: str
    # Makes the TVM Target in dict form (0.27 rejects option strings), on first use of tvm_target: the host's
    # asks LLVM to name the CPU, which imports TVM (and torch), so listing the targets must not make it.
    make_tvm_target: Callable[[], dict]
    arch: str  # "x86_64" or "aarch64": which machine can load the .so
    device: str = "cpu"  # "cpu" or "cuda": where the model runs
    cross_compiler: str | None = None  # None = build with the host's compiler
    facts: dict = field(default_factory=dict)  # hardware numbers schedules and reports use

    @cached_property
    def tvm_target(self) -> dict:
        return self.make_tvm_target()

    def target(self):
        import tvm

        return tvm.target.Target(self.tvm_target)

    def summary(self) -> str:
        return f"{self.name:<24} {self.device:<5} {self.arch:<8} {self.description}"
