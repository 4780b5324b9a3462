"""Registry of compile targets: each a frozen description of a device and how to build for it."""

from __future__ import annotations

from ..errors import BmvccError
from .base import TargetSpec
from .cpu import AARCH64, host

_FACTORIES = {"host": host, "aarch64": lambda: AARCH64}


def names() -> list[str]:
    return list(_FACTORIES)


def get(name: str) -> TargetSpec:
    if name not in _FACTORIES:
        raise BmvccError(f"unknown target '{name}'; choose one of: {', '.join(_FACTORIES)} (bmvcc targets lists them)")
    return _FACTORIES[name]()


__all__ = ["TargetSpec", "get", "names"]
