"""The instruction-set extensions a CPU artifact's code may use, recorded at compile time for the load-time check.

An artifact is compiled for an LLVM CPU (its mcpu) and the features that name implies or -mattr adds; LLVM may select
instructions from any of them anywhere (bmvcc's kernels, its own vectorizers), so a CPU lacking one dies on SIGILL.
compile records those of FEATURES that the target has, each with its /proc/cpuinfo flag, in metadata.json
(target.isa); bmvcc.runtime.check_cpu_features refuses a CPU whose /proc/cpuinfo lacks one, before the library loads.
"""

from __future__ import annotations

# LLVM feature -> the flag Linux prints for it in /proc/cpuinfo ("flags" on x86_64, "Features" on aarch64): the vector
# and bit-manipulation extensions LLVM's code generation selects instructions from. Only those Linux prints (not
# avxifma or avxvnniint8, which it hides: every CPU would seem to lack them). Not AMX: its kernels ask Linux for the
# tile state themselves (errors.amx_refusal), and the host target keeps only the AMX this machine runs (targets/cpu.py).
FEATURES = {
    "x86_64": {
        "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2",
        "avx512f": "avx512f", "avx512cd": "avx512cd", "avx512bw": "avx512bw", "avx512dq": "avx512dq",
        "avx512vl": "avx512vl", "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16",
        "avx512vbmi": "avx512vbmi", "avx512vbmi2": "avx512_vbmi2", "avx512ifma": "avx512ifma",
        "avx512bitalg": "avx512_bitalg", "avx512vpopcntdq": "avx512_vpopcntdq",
        "avx512vp2intersect": "avx512_vp2intersect", "avxvnni": "avx_vnni", "gfni": "gfni",
    },
    "aarch64": {"dotprod": "asimddp", "fullfp16": "asimdhp", "i8mm": "i8mm", "bf16": "bf16", "sve": "sve",
                "sve2": "sve2"},
}


def record(tvm_target: dict, arch: str) -> dict | None:
    """metadata.json's target.isa for a TargetSpec's `tvm_target` (a CPU's, or a GPU's with its host CPU) on `arch`:
    {"mcpu": the LLVM CPU, "features": {LLVM feature: cpuinfo flag} of those it has}; None without an LLVM CPU
    target."""
    import tvm
    from tvm.target import codegen

    cpu = tvm_target if tvm_target.get("kind") == "llvm" else tvm_target.get("host")
    if not isinstance(cpu, dict) or cpu.get("kind") != "llvm":
        return None
    target = tvm.target.Target(cpu)
    features = {name: flag for name, flag in FEATURES.get(arch, {}).items()
                if codegen.target_has_features(name, target)}
    return {"mcpu": cpu.get("mcpu", arch), "features": features}
