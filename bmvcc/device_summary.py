"""`bmvcc inspect OUTDIR`: what a GPU artifact carries: the device binary (OUTDIR/device.cubin, the
bytes embedded in model.so), its SASS, and per kernel the ptxas resources and SASS instruction mix."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
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


@dataclass
class SassCode:
    """One kernel's SASS in address order: opcodes, whether each is predicated, the label a branch or call goes to
    (else None), and label -> index of the instruction after it."""

    opcodes: list[str] = field(default_factory=list)
    guarded: list[bool] = field(default_factory=list)
    targets: list[str | None] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)

    def hot_end(self) -> int:
        """Index after the last unpredicated EXIT: what follows (slow paths the code calls or branches to and
        returns from, the final branch to itself, alignment NOPs) runs rarely or never."""
        return 1 + max((i for i, (op, g) in enumerate(zip(self.opcodes, self.guarded)) if op == "EXIT" and not g),
                       default=len(self.opcodes) - 1)

    def branches(self) -> list[tuple[int, int]]:
        """(index, target index) of the BRA instructions."""
        return [(i, self.labels[t]) for i, (op, t) in enumerate(zip(self.opcodes, self.targets))
                if op == "BRA" and t in self.labels]


_SECTION = re.compile(r"\s*\.section\s+\.text\.(\w+)")
_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)[^;`]*(?:`\((\.L_x_\d+)\))?")


def kernel_code(sass_text: str) -> dict[str, SassCode]:
    """Kernel name -> its SassCode, from nvdisasm output (one .text.<kernel> section each)."""
    code: dict[str, SassCode] = {}
    current = None
    for line in sass_text.splitlines():
        sec = _SECTION.match(line)
        if sec:
            current = code.setdefault(sec.group(1), SassCode())
            continue
        if current is None:
            continue
        label = re.match(r"\s*(\.L_x_\d+):", line)
        ins = None if label else _INSTRUCTION.search(line)
        if label:
            current.labels[label.group(1)] = len(current.opcodes)
        elif ins:
            current.opcodes.append(ins.group(2))
            current.guarded.append(ins.group(1) is not None)
            current.targets.append(ins.group(3))
    return code


def kernel_mix(sass_text: str) -> dict[str, dict[str, int]]:
    """Kernel name -> {instruction family: count} from nvdisasm output."""
    mix: dict[str, dict[str, int]] = {}
    for kernel, code in kernel_code(sass_text).items():
        current = mix.setdefault(kernel, {})
        for opcode in code.opcodes:
            family = next((f for f in MIX if opcode == f or opcode.startswith(f)), None)
            if family is not None:
                current[family] = current.get(family, 0) + 1
    return mix


def summary(outdir: Path) -> dict:
    cubin, meta = _cubin(outdir)
    mix = kernel_mix(cubin.sass())
    kernels = {name: {"resources": meta["resources"].get(name), "sass_mix": mix.get(name, {}),
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
