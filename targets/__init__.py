"""Registry of compile targets: each a frozen description of a device and how to build for it."""

from __future__ import annotations

from ..errors import BmvccError
from .base import TargetSpec
from .cpu import AARCH64, host
from .cuda import cuda_sm80, cuda_sm86, cuda_sm87
from .jetson import jetson_orin_nano, jetson_orin_nano_4gb, jetson_orin_nano_super

_FACTORIES = {"host": host, "aarch64": lambda: AARCH64, "cuda-sm80": cuda_sm80, "cuda-sm86": cuda_sm86,
              "cuda-sm87": cuda_sm87, "jetson-orin-nano": jetson_orin_nano,
              "jetson-orin-nano-4gb": jetson_orin_nano_4gb, "jetson-orin-nano-super": jetson_orin_nano_super}


def names() -> list[str]:
    return list(_FACTORIES)


def get(name: str | TargetSpec) -> TargetSpec:
    """The target registered as `name`; a TargetSpec (Python API, e.g. cpu.host(mcpu)) is returned as it is."""
    if isinstance(name, TargetSpec):
        return name
    if name not in _FACTORIES:
        raise BmvccError(f"unknown target '{name}'; choose one of: {', '.join(_FACTORIES)} (bmvcc targets lists them)")
    return _FACTORIES[name]()


__all__ = ["TargetSpec", "get", "names"]
