"""The instruction-set guard: a CPU artifact records the features its code may use (targets/isa.py) and loading it
on a CPU whose /proc/cpuinfo lacks one is a one-line error, not SIGILL (bmvcc.runtime.check_cpu_features)."""

from __future__ import annotations

import platform
import re
import subprocess
import sys

import numpy as np
import pytest
import tvm
from tvm.target import codegen

from bmvcc import artifact, bench, runtime, targets
from bmvcc.driver import CompileOptions, compile_model
from bmvcc.errors import BmvccError
from bmvcc.targets.base import TargetSpec
from bmvcc.targets.isa import FEATURES, record

from conftest import small_config, with_mattr

ZEN4 = {"mcpu": "znver4", "features": {"avx2": "avx2", "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16"}}
# Features Linux prints on a Jetson Orin (Cortex-A78AE) and a Raspberry Pi 4 (Cortex-A72, no dot product)
ORIN_FLAGS = frozenset("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop "
                       "asimddp uscat ilrcpc flagm paca pacg".split())
PI4_FLAGS = frozenset("fp asimd evtstrm crc32 cpuid".split())
FIX = "; compile it with --target host on this machine (or for a target without {})"


def test_a_cpu_with_every_recorded_feature_runs_one_without_is_refused_naming_them():
    runtime.check_cpu_features({"isa": ZEN4}, frozenset({"fpu", "avx2", "avx512_vnni", "avx512_bf16"}))
    with pytest.raises(BmvccError) as e:
        runtime.check_cpu_features({"isa": ZEN4}, frozenset({"fpu", "avx2", "avx512f"}))
    assert str(e.value) == ("this model was compiled for znver4 and uses avx512vnni, avx512bf16, which this CPU lacks"
                            + FIX.format("them"))
    with pytest.raises(BmvccError) as e:
        runtime.check_cpu_features({"isa": ZEN4}, frozenset({"avx2", "avx512_vnni"}))
    assert str(e.value).endswith("uses avx512bf16, which this CPU lacks" + FIX.format("it"))


def test_aarch64_features_are_checked_by_their_cpuinfo_names():
    """The generic aarch64 target (Cortex-A78 with sdot) as LLVM records it: an Orin runs it, a Raspberry Pi 4 not.
    A GPU target records its host CPU's (the Orin's Cortex-A78AE); a target without an LLVM CPU records nothing."""
    spec = targets.get("aarch64")
    isa = record(spec.tvm_target, spec.arch)
    assert isa == {"mcpu": "cortex-a78", "features": {"dotprod": "asimddp", "fullfp16": "asimdhp"}}
    orin = targets.get("jetson-orin-nano")
    assert record(orin.tvm_target, orin.arch) == {**isa, "mcpu": "cortex-a78ae"}
    assert record({"kind": "cuda", "arch": "sm_87"}, "aarch64") is None
    runtime.check_cpu_features({"isa": isa}, ORIN_FLAGS)
    with pytest.raises(BmvccError, match="compiled for cortex-a78 and uses dotprod, fullfp16, which this CPU lacks"):
        runtime.check_cpu_features({"isa": isa}, PI4_FLAGS)


def test_unknown_features_or_cpu_are_not_checked():
    """An artifact compiled before bmvcc recorded its features, or a GPU target without an LLVM host, loads as before;
    so does any artifact where there is no /proc/cpuinfo (not Linux)."""
    for target in ({}, {"isa": None}):
        runtime.check_cpu_features(target, frozenset())
    runtime.check_cpu_features({"isa": ZEN4}, None)


@pytest.mark.parametrize("arch, cpus", [("x86_64", ["sapphirerapids", "znver5"]),
                                        ("aarch64", ["neoverse-v2"])])
def test_every_feature_in_the_table_is_one_llvm_knows(arch, cpus):
    """LLVM answers False for a feature name it does not know (a typo would never be recorded): each is had by a
    real CPU of its architecture."""
    triple = {"mtriple": "aarch64-linux-gnu"} if arch == "aarch64" else {}
    known = {name for cpu in cpus for name in FEATURES[arch]
             if codegen.target_has_features(name, tvm.target.Target({"kind": "llvm", "mcpu": cpu, **triple}))}
    assert known == set(FEATURES[arch])


# A feature of the table that each CI machine lacks: AMD CPUs avx512fp16, Intel's AMX Xeons (Sapphire, Emerald and
# Granite Rapids) avx512vp2intersect; an aarch64 machine SVE2, i8mm or bf16.
LACKABLE = {"x86_64": ["avx512fp16", "avx512vp2intersect"], "aarch64": ["sve2", "i8mm", "bf16"]}


def _feature_this_cpu_lacks() -> str | None:
    flags, table = runtime.cpuinfo_flags(), FEATURES.get(platform.machine(), {})
    return None if flags is None else next((f for f in LACKABLE.get(platform.machine(), []) if table[f] not in flags),
                                           None)


LACKING = _feature_this_cpu_lacks()


@pytest.mark.skipif(LACKING is None, reason="this CPU has every feature of LACKABLE (or there is no /proc/cpuinfo)")
def test_an_artifact_using_a_feature_this_cpu_lacks_is_refused_not_sigill(checkpoint, tmp_path):
    """The small model compiled for this CPU plus a feature it lacks (-mattr=+FEATURE): `bmvcc run` and `bench` print
    one error line naming it and exit 2 (in a subprocess: a SIGILL would be exit -4), writing nothing; bench --profile
    over RPC does not record the calls here. One compile."""
    host = targets.get("host")
    tvm_target = with_mattr(host.tvm_target, f"+{LACKING}")
    spec = TargetSpec(name="host-plus", description="this CPU plus a feature it lacks",
                      make_tvm_target=lambda: tvm_target, arch=host.arch, facts=host.facts)
    out, images, logits = tmp_path / "out", tmp_path / "images.npy", tmp_path / "logits.npy"
    compile_model(checkpoint(small_config(depth=1))[0], out, CompileOptions(target=spec))
    np.save(images, np.zeros((1, 1, 28, 28), np.float32))
    flags = runtime.cpuinfo_flags()
    for argv in (["run", str(out), "--input", str(images), "-o", str(logits)], ["bench", str(out), "--repeat", "1"]):
        proc = subprocess.run([sys.executable, "-m", "bmvcc.cli", *argv], capture_output=True, text=True, timeout=300)
        lines = [line for line in proc.stderr.splitlines() if not line.startswith("[bmvcc] ")]
        assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr)
        found = re.fullmatch(r"error: this model was compiled for (\S+) and uses (.+), which this CPU lacks; compile "
                             r"it with --target host on this machine \(or for a target without (it|them)\)", lines[0])
        assert found and found[1] == tvm_target["mcpu"], lines[0]
        named = found[2].split(", ")
        assert LACKING in named and not {FEATURES[host.arch][f] for f in named} & flags, named
        assert (found[3] == "it") == (len(named) == 1), lines[0]
    assert not logits.exists()
    meta = artifact.read_metadata(out)  # bench --profile over RPC records the calls here: refused before it loads
    with pytest.raises(BmvccError, match=f"on this machine, whose CPU lacks .*{LACKING}.* run bmvcc bench --profile "
                                         "on the device itself"):
        bench._record_locally(out, meta["target"], meta, None, None)


# A CPU that LLVM knows to have each LACKABLE x86 feature
CPU_WITH = {"avx512fp16": "sapphirerapids", "avx512vp2intersect": "tigerlake"}


@pytest.mark.skipif(LACKING not in CPU_WITH, reason="no x86 feature of LACKABLE this CPU lacks (or no /proc/cpuinfo)")
def test_host_for_a_cpu_this_machine_cannot_run_is_refused_when_made():
    """targets.cpu.host(mcpu) (bench_model_cpu --mcpu): a CPU with a feature this one lacks, or a name LLVM does not know
    for this machine, is an error before any compile."""
    cpu = CPU_WITH[LACKING]
    with pytest.raises(BmvccError, match=f"^LLVM CPU {cpu} has .*{LACKING}.*, which this CPU lacks; name a CPU this "
                                         "machine runs$"):
        targets.cpu.host(cpu)
    with pytest.raises(BmvccError, match="^'cortex-a78' is not an LLVM CPU of this machine"):
        targets.cpu.host("cortex-a78")


@pytest.mark.skipif(runtime.cpuinfo_flags() is None, reason="no /proc/cpuinfo")
def test_host_turns_off_the_features_its_cpu_name_claims_but_the_cpu_hides():
    """A virtual machine hiding a feature of its CPU model (here each recorded one in turn, removed from this CPU's
    flags): the host target turns it off, so nothing is built that the CPU would refuse; with every flag, nothing."""
    from bmvcc.targets.cpu import _host_target

    flags, mcpu = runtime.cpuinfo_flags(), targets.get("host").tvm_target["mcpu"]
    features = record({"kind": "llvm", "mcpu": mcpu}, platform.machine())["features"]
    assert features, mcpu
    assert not {f for f in _host_target(2, None, flags | set(features.values())).get("mattr", [])
                if f.lstrip("-") in features}
    for name, flag in features.items():
        target = _host_target(2, None, flags - {flag})
        assert f"-{name}" in target["mattr"], (name, target)
        assert name not in record(target, platform.machine())["features"]
