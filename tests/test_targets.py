"""Target registry: every target builds a TVM Target, and the Jetson facts agree with each other."""

from __future__ import annotations

import pytest

from bmvcc import targets
from bmvcc.errors import BmvccError


@pytest.mark.parametrize("name", targets.names())
def test_every_target_makes_a_tvm_target(name):
    spec = targets.get(name)
    tgt = spec.target()
    assert spec.name == name
    if spec.device == "cuda":
        assert tgt.kind.name == "cuda" and str(tgt.attrs["arch"]) == spec.facts["arch"]
        assert int(tgt.attrs["max_shared_memory_per_block"]) == spec.facts["max_shared_bytes_per_block"]


def test_generic_targets_registered():
    assert {"cuda-sm80", "cuda-sm86", "cuda-sm87", "aarch64", "jetson-orin-nano", "jetson-orin-nano-4gb",
            "jetson-orin-nano-super"} <= set(targets.names())
    assert targets.get("cuda-sm86").facts["max_shared_bytes_per_block"] == 99 * 1024


def test_orin_nano_fixes_tvm_tag():
    """TVM's own tag says carmel and 48 KB; the bmvcc target says Cortex-A78AE with dotprod and 163 KB."""
    import tvm

    tag = tvm.target.Target("nvidia/jetson-orin-nano")
    tgt = targets.get("jetson-orin-nano").target()
    assert str(tag.host.attrs["mcpu"]) == "carmel" and int(tag.attrs["max_shared_memory_per_block"]) == 48 * 1024
    assert str(tgt.host.attrs["mcpu"]) == "cortex-a78ae" and bool(tgt.host.attrs["feature.has_dotprod"])
    assert int(tgt.attrs["max_shared_memory_per_block"]) == 163 * 1024


@pytest.mark.parametrize("name,sms,mhz,gbs,sparse_tops", [
    ("jetson-orin-nano", 8, 625, 68, 40), ("jetson-orin-nano-4gb", 4, 625, 34, 20),
    ("jetson-orin-nano-super", 8, 1020, 102, 67)])
def test_orin_nano_facts(name, sms, mhz, gbs, sparse_tops):
    """Dense int8 peak from SMs x per-clock rate x clock matches half of NVIDIA's published sparse TOPS
    (40 / 20 / 67 TOPS) to within the rounding of the published figure."""
    f = targets.get(name).facts
    assert (f["sms"], f["gpu_clock_mhz"], f["dram_bandwidth_gbs"]) == (sms, mhz, gbs)
    assert 2 * f["peak_int8_tops"] == pytest.approx(sparse_tops, rel=0.03)
    assert f["peak_fp16_tflops"] == pytest.approx(f["peak_int8_tops"] / 2)
    assert f["arch"] == "sm_87" and targets.get(name).arch == "aarch64"


def test_unknown_target_is_a_bmvcc_error():
    with pytest.raises(BmvccError, match="unknown target 'nope'.*choose one of"):
        targets.get("nope")
