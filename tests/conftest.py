"""Shared fixtures: small BitMedViT checkpoints with realistic weights, for every model family.

`make_model(cfg, seed)` gives an eval-mode BitMedViT whose parameters look trained rather than
freshly initialized: every weight matrix randn-distributed (so each BitLinear has -1, 0 and +1
codes), every norm gain and bias away from its init (1 and 0), a non-trivial position embedding.
`save_checkpoint(path, cfg, seed)` writes its state dict. The `checkpoint` fixture caches one file
per (config, seed) for the session.

A test run must leave no process of its own running: at the end of the session, any process the run
started that is still alive (see `pytest_sessionfinish`) fails the run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import uuid
from pathlib import Path

import psutil
import pytest
import torch

from bmvcc.model import BitMedViT, ViTConfig

RUN_TAG = "BMVCC_TEST_RUN"  # environment variable every process started by this test run inherits
EXIT_GRACE_S = 10  # how long processes left at the end of the run get to exit by themselves
_LEFT_RUNNING = pytest.StashKey[str]()  # their description, for the terminal summary


def leftover_processes(processes, grace_s: float = EXIT_GRACE_S) -> list:
    """Those of `processes` still running after `grace_s` (zombies, already dead, do not count)."""
    _, alive = psutil.wait_procs(list(processes), timeout=grace_s)
    return [p for p in alive if _running(p)]


def tagged_processes(tag_variable: str, tag: str) -> list:
    """Live processes other than this one with `tag_variable`=`tag` in their environment: whatever a
    process started with that environment started in turn, orphans (whose parent died) included."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get(tag_variable) == tag:
                found.append(p)
        except psutil.Error:  # exited, a zombie, or not ours to read
            pass
    return found


def _running(process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def describe(processes) -> str:
    lines = []
    for p in processes:
        try:
            lines.append(f"  pid {p.pid} (parent {p.ppid()}): {' '.join(p.cmdline())[:300]}")
        except psutil.Error:
            lines.append(f"  pid {p.pid}: exited")
    return "\n".join(lines)


def pytest_configure(config):
    os.environ[RUN_TAG] = uuid.uuid4().hex


def pytest_sessionfinish(session, exitstatus):
    """Fails the run when processes it started are still running (killed, then listed in the summary)."""
    started = {p.pid: p for p in psutil.Process().children(recursive=True)}
    started.update((p.pid, p) for p in tagged_processes(RUN_TAG, os.environ[RUN_TAG]))
    left = leftover_processes(started.values())
    if not left:
        return
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
    session.config.stash[_LEFT_RUNNING] = describe(left)
    for p in left:
        try:
            p.kill()
        except psutil.Error:  # gone meanwhile
            pass


def pytest_terminal_summary(terminalreporter):
    left = terminalreporter.config.stash.get(_LEFT_RUNNING, None)
    if left:
        terminalreporter.write_sep("=", "processes started by the tests still running (killed)", red=True)
        terminalreporter.write_line(left)


# (multi_query, fp_attn): the four attention families of docs/bitmedvit.md
FAMILIES = [(True, False), (True, True), (False, False), (False, True)]


def with_mattr(tvm_target: dict, *features: str) -> dict:
    """`tvm_target` (a dict) with `features` ("+amx-tile", "-avx512bf16", ...) added to its own mattr (the host target
    may carry some: the features it turns off)."""
    return {**tvm_target, "mattr": [*tvm_target.get("mattr", []), *features]}


def family_id(multi_query: bool, fp_attn: bool) -> str:
    return f"{'mq' if multi_query else 'mh'}-{'fp' if fp_attn else 'bit'}"


def small_config(multi_query: bool = True, fp_attn: bool = False, **overrides) -> ViTConfig:
    """28x28 grayscale, 16 tokens of 7x7 px, dim 32, depth 2, 4 heads, 10 classes."""
    base = dict(image_size=28, patch_size=7, channels=1, num_classes=10, dim=32, depth=2, heads=4,
                mlp_dim=64, multi_query=multi_query, fp_attn=fp_attn)
    return ViTConfig(**{**base, **overrides})


def make_model(cfg: ViTConfig, seed: int = 0) -> BitMedViT:
    """An eval-mode BitMedViT with trained-looking weights (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    model = BitMedViT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name == "pos_embedding":
                p.copy_(0.5 * noise)
            elif p.dim() == 2:  # Linear weights: randn / sqrt(fan_in) keeps activations O(1)
                p.copy_(noise / math.sqrt(p.shape[1]))
            elif name.endswith("weight"):  # RMSNorm / LayerNorm gains
                p.copy_(1.0 + 0.3 * noise)
            else:  # biases
                p.copy_(0.2 * noise)
    return model.eval()


def save_checkpoint(path: Path, cfg: ViTConfig, seed: int = 0) -> BitMedViT:
    """Writes the state dict of make_model(cfg, seed) to `path` and returns the model."""
    model = make_model(cfg, seed)
    torch.save(model.state_dict(), path)
    return model


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(cfg, seed=0) -> (path, eval-mode model), one file per (cfg, seed) per session."""
    root = tmp_path_factory.mktemp("checkpoints")
    cache: dict = {}

    def get(cfg: ViTConfig, seed: int = 0):
        key = (cfg, seed)
        if key not in cache:
            fields = dataclasses.astuple(cfg)
            path = root / ("vit_" + "_".join(str(int(f)) for f in fields) + f"_s{seed}.pth")
            cache[key] = (path, save_checkpoint(path, cfg, seed))
        return cache[key]

    return get


@pytest.fixture(scope="session")
def orin_build(checkpoint, tmp_path_factory):
    """The small config compiled for jetson-orin-nano once per session (tests copy it before changing it)."""
    from bmvcc.driver import CompileOptions, compile_model

    out = tmp_path_factory.mktemp("orin") / "out"
    compile_model(checkpoint(small_config())[0], out, CompileOptions(target="jetson-orin-nano"))
    return out


def cli_error(capsys, argv: list[str]) -> str:
    """Runs `bmvcc ARGV` in-process, expecting a user error; returns its one stderr line.

    Asserts exit status 2, no traceback, and exactly one line on stderr besides `[bmvcc] ...`
    progress lines, starting with "error: ".
    """
    from bmvcc.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2, captured.err
    assert "Traceback" not in captured.err
    lines = [line for line in captured.err.splitlines() if not line.startswith("[bmvcc] ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]
