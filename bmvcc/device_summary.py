"""`bmvcc inspect OUTDIR`: what a GPU artifact carries: the device binary (OUTDIR/device.cubin, the
bytes embedded in model.so), its SASS, and per kernel the ptxas resources and SASS instruction mix."""

from __future__ import annotations

import json
import re
from pathlib import Path

from . import artifact
from .artifact import DEVICE_BINARY, DEVICE_INFO
from .errors import BmvccError

# instruction families reported in the mix (SASS mnemonic prefixes)
MIX = ("IMMA", "HMMA", "LDSM", "LDGSTS", "LDG", "STG", "LDS", "STS", "SHFL", "BAR", "FFMA", "FMUL", "FADD",
       "IMAD", "LOP3", "MUFU")


def _cubin(outdir: Path):
    from .targets.cuda_toolchain import Cubin

    path = Path(outdir) / DEVICE_BINARY
    info = Path(outdir) / DEVICE_INFO
    if DEVICE_BINARY not in artifact.read_metadata(outdir)["files"]:  # which checks the recorded files
        raise BmvccError(f"'{outdir}' has no {DEVICE_BINARY}: it is not a GPU artifact; compile with a CUDA "
                         "target, e.g. bmvcc compile CKPT --target jetson-orin-nano -o OUTDIR")
    meta = json.loads(info.read_text())
    return Cubin(arch=meta["arch"], data=path.read_bytes(), resources=()), meta


def sass(outdir: Path) -> str:
    """nvdisasm's SASS of the artifact's device binary."""
    cubin, _ = _cubin(outdir)
    return cubin.sass()


def _opcodes(sass_text: str):
    """(kernel, opcode, instruction line, the label right before it or None) per SASS instruction of nvdisasm
    output (one .text.<kernel> section each)."""
    current = label = None
    for line in sass_text.splitlines():
        sec = re.match(r"\s*\.section\s+\.text\.(\w+)", line)
        if sec:
            current = sec.group(1)
            continue
        op = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if current is not None and op:
            yield current, op.group(1), line, label
        named = re.match(r"(\.L_x_\d+):", line)
        label = named.group(1) if named else None if op else label


def kernel_mix(sass_text: str) -> dict[str, dict[str, int]]:
    """Kernel name -> {instruction family: count} from nvdisasm output."""
    mix: dict[str, dict[str, int]] = {}
    for kernel, opcode, _, _ in _opcodes(sass_text):
        current = mix.setdefault(kernel, {})
        family = next((f for f in MIX if opcode == f or opcode.startswith(f)), None)
        if family is not None:
            current[family] = current.get(family, 0) + 1
    return mix


def kernel_sizes(sass_text: str) -> dict[str, int]:
    """Kernel name -> its SASS instructions, without the alignment NOPs and the branch to itself that end the code."""
    sizes: dict[str, int] = {}
    for kernel, opcode, line, label in _opcodes(sass_text):
        if opcode != "NOP" and not (opcode == "BRA" and f"`({label})" in line):
            sizes[kernel] = sizes.get(kernel, 0) + 1
    return sizes


def summary(outdir: Path) -> dict:
    cubin, meta = _cubin(outdir)
    text = cubin.sass()
    mix, sizes = kernel_mix(text), kernel_sizes(text)
    kernels = {name: {"resources": meta["resources"].get(name), "sass_mix": mix.get(name, {}), "sass_size": sizes.get(name),
                      "bmvcc_kernel": meta["bmvcc_kernels"].get(name.removesuffix("_kernel"), {}).get("kernel")}
               for name in sorted(set(mix) | set(meta["resources"]))}
    return {"arch": meta["arch"], "device_binary": DEVICE_BINARY, "bytes": len(cubin.data), "kernels": kernels}


def format_text(s: dict) -> str:
    lines = [f"{s['device_binary']}: {s['bytes']:,} B cubin for {s['arch']}, {len(s['kernels'])} kernels"]
    for name, k in s["kernels"].items():
        r = k["resources"] or {}
        mix = " ".join(f"{f}:{n}" for f, n in k["sass_mix"].items() if f in ("IMMA", "HMMA", "LDSM", "LDGSTS"))
        lines.append(f"  {name:<48} regs {r.get('registers', '?'):>3}  smem {r.get('shared_bytes', '?'):>6} B  {mix}")
    return "\n".join(lines)
