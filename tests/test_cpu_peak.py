"""targets/cpu_peak.py and benchmarks/common.model_macs: the machine bound bench_model_cpu.py prints."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bmvcc.model import BitMedViT, ViTConfig
from bmvcc.targets.cpu_peak import AMX_INT8_MACS, FAMILIES, CpuPeak, host_peak, measured_ghz

from conftest import small_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import model_macs  # noqa: E402


def test_model_macs_match_torch_flop_counter():
    """torch counts 2 FLOPs per MAC of every matmul and linear, the attention's masked half included:
    its total is the int8 + float count plus the masked half of Q K^T and P V."""
    cfg = small_config(fp_attn=True)
    model = BitMedViT(cfg).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, cfg.channels, cfg.image_size, cfg.image_size))
    int8, fp32 = model_macs(vars(cfg))
    n, head_dim = (cfg.image_size // cfg.patch_size) ** 2, cfg.dim // cfg.heads
    masked = cfg.depth * 2 * cfg.heads * head_dim * (n * n - n * (n + 1) // 2)
    assert counter.get_total_flops() == 2 * (int8 + fp32 + masked)
    assert int8 == cfg.depth * 2 * n * cfg.dim * cfg.mlp_dim


def test_bound_adds_the_int8_and_fp32_times():
    peak = CpuPeak("znver4", *FAMILIES["znver4"], ghz=2.5, cores=2)
    assert peak.int8_ops_per_s() == 2 * 64 * 2 * 2.5e9 and peak.fp32_ops_per_s() == 2 * 16 * 2 * 2.5e9
    assert peak.bound_ms(640e9, 0) == 1e3 * 2 * 640e9 / 640e9
    assert peak.bound_ms(6.4e9, 1.6e9) == 1e3 * (2 * 6.4e9 / 640e9 + 2 * 1.6e9 / 160e9)
    assert host_peak(2, "no-such-cpu") is None


def test_host_clock_is_measured_and_plausible():
    """The dependent add/xor chain gives this core's clock: between 0.5 and 6 GHz on any CPU that runs
    the tests (a chain LLVM folded or vectorized would give far more, a wrong cycle count far less)."""
    assert 0.5 < measured_ghz() < 6
    peak = host_peak(2, "znver4")
    assert peak.ghz == measured_ghz() and "GHz (measured)" in peak.describe()


def test_int8_peak_is_amx_where_the_w2a8_kernels_run_on_it():
    """Sapphire Rapids: tdpbssd's 1024 MAC/cycle/core with the amx backend (the caller says), vpdpbusd's 128
    without, the default."""
    amx, vnni = host_peak(2, "sapphirerapids", amx=True), host_peak(2, "sapphirerapids")
    assert (amx.int8_macs_per_cycle, vnni.int8_macs_per_cycle) == (AMX_INT8_MACS, 128) == (1024, 128)
    assert amx.fp32_fmas_per_cycle == vnni.fp32_fmas_per_cycle == 32
    assert "1024 MAC/cycle/core, AMX" in amx.describe() and "AMX" not in vnni.describe()
