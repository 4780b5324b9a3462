"""IR saved as JSON without the installation's paths in it.

TVMScript spans record the absolute path of the file a compute definition was parsed from (wherever
bmvcc is installed). Artifacts and tuning databases name the module instead ("bmvcc/schedules/w2a8.py"),
so the same bmvcc anywhere writes the same bytes and no user's paths leak.
"""

from __future__ import annotations

import functools
import json
import os
import sys


def portable_json(text: str) -> str:
    """tvm.ir.save_json output with each absolute ir.SourceName that is an imported module's file
    replaced by that module's path relative to sys.path (others are kept)."""
    graph = json.loads(text)
    modules = _module_paths(tuple((module.__name__, module.__file__) for module in list(sys.modules.values())
                                  if getattr(module, "__file__", None)))
    for node in graph["nodes"]:
        if node["type"] == "ir.SourceName" and os.path.isabs(node["data"]):
            node["data"] = modules.get(os.path.realpath(node["data"]), node["data"])
    return json.dumps(graph, separators=(",", ":"))


@functools.lru_cache(maxsize=1)
def _module_paths(modules: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """{real path of each (module name, file)'s file: the module's path relative to sys.path}; cached while no
    module is imported (a new one changes the argument), as bmvcc tune saves one workload after another."""
    return {os.path.realpath(file): name.replace(".", "/") + (
        "/__init__.py" if os.path.basename(file) == "__init__.py" else ".py") for name, file in modules}
