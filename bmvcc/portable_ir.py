"""IR saved as JSON without the installation's paths in it.

TVMScript spans record the absolute path of the file a compute definition was parsed from (wherever
bmvcc is installed). Artifacts and tuning databases name the module instead ("bmvcc/schedules/w2a8.py"),
so the same bmvcc anywhere writes the same bytes and no user's paths leak.
"""

from __future__ import annotations

import json
import os
import sys


def portable_json(text: str) -> str:
    """tvm.ir.save_json output with each absolute ir.SourceName that is an imported module's file
    replaced by that module's path relative to sys.path (others are kept)."""
    graph = json.loads(text)
    modules = {os.path.realpath(module.__file__): module.__name__.replace(".", "/") + (
        "/__init__.py" if os.path.basename(module.__file__) == "__init__.py" else ".py")
        for module in list(sys.modules.values()) if getattr(module, "__file__", None)}
    for node in graph["nodes"]:
        if node["type"] == "ir.SourceName" and os.path.isabs(node["data"]):
            node["data"] = modules.get(os.path.realpath(node["data"]), node["data"])
    return json.dumps(graph, separators=(",", ":"))
