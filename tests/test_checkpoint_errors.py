"""Bad checkpoints through the real CLI: one error line naming problem and fix, exit 2, no artifact.

Every case stops before the build, so these run in-process (bmvcc.cli.main, as the `bmvcc` script
calls it) and take a fraction of a second each; test_cli.py runs a few of them as real processes.
"""

from __future__ import annotations

import random

import pytest
import torch

from conftest import cli_error, small_config

MH = small_config(False, False)  # multi-head: needs --heads
MQ = small_config(True, False)


class Custom:
    """Unpickling this needs code execution: weights_only=True refuses it."""

    def __init__(self):
        self.note = "training run 7"


@pytest.fixture
def state(checkpoint):
    """A fresh copy of a valid multi-query state dict, to break."""
    _, model = checkpoint(MQ)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _expect(capsys, tmp_path, argv, *needles):
    out = tmp_path / "out"
    line = cli_error(capsys, ["compile", *map(str, argv), "-o", str(out)])
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no staging left
    return line


def test_missing_file(capsys, tmp_path):
    _expect(capsys, tmp_path, [tmp_path / "nope.pth"], "does not exist", "check the path")


def test_random_bytes(capsys, tmp_path):
    path = tmp_path / "noise.pth"
    path.write_bytes(random.Random(0).randbytes(4096))
    _expect(capsys, tmp_path, [path], "noise.pth", "is not a PyTorch checkpoint", "torch.save(model.state_dict()")


def test_text_file(capsys, tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("epoch 10: val acc 0.91\n")
    _expect(capsys, tmp_path, [path], "notes.pth", "is not a PyTorch checkpoint", "torch.save(model.state_dict()")


def test_truncated(capsys, tmp_path, checkpoint):
    path, _ = checkpoint(MQ)
    cut = tmp_path / "cut.pth"
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    _expect(capsys, tmp_path, [cut], "truncated or corrupt", "copy the checkpoint again")


def test_pickled_code_refused_then_trusted(capsys, tmp_path, state):
    path = tmp_path / "custom.pth"
    torch.save({"weights": state, "info": Custom()}, path)
    _expect(capsys, tmp_path, [path], "pickled code", "--trust-pickle")
    # Trusted, it loads and fails at the next check: a non-tensor entry.
    _expect(capsys, tmp_path, [path, "--trust-pickle"], "'weights' is not a tensor", "state_dict()")


@pytest.mark.parametrize("obj, kind", [(torch.zeros(3, 3), "Tensor"), ([torch.zeros(2)], "list"), ({}, "dict")],
                         ids=["tensor", "list", "empty"])
def test_not_a_state_dict(capsys, tmp_path, obj, kind):
    path = tmp_path / "obj.pth"
    torch.save(obj, path)
    _expect(capsys, tmp_path, [path], f"holds a {kind}, not a state dict", "model.state_dict()")


def test_wrapped_state_dict_is_accepted(state):
    # {"state_dict": ...} and "module." prefixes (DataParallel) are common and unwrapped.
    from bmvcc.checkpoint import _unwrap

    got = _unwrap({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, "x.pth")
    assert got.keys() == state.keys()


def _save(tmp_path, state):
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    return path


def test_missing_key(capsys, tmp_path, state):
    del state["transformer.layers.1.3.net.2.norm.weight"]
    _expect(capsys, tmp_path, [_save(tmp_path, state)], "missing key 'transformer.layers.1.3.net.2.norm.weight'")


def test_missing_essential_key(capsys, tmp_path, state):
    del state["pos_embedding"]
    _expect(capsys, tmp_path, [_save(tmp_path, state)], "missing key 'pos_embedding'", "not a BitMedViT")


def test_unexpected_key(capsys, tmp_path, state):
    state["transformer.layers.0.0.extra.weight"] = torch.zeros(3)
    _expect(capsys, tmp_path, [_save(tmp_path, state)], "unexpected key 'transformer.layers.0.0.extra.weight'")


@pytest.mark.parametrize("key, shape, needle", [
    ("transformer.layers.1.3.net.2.weight", (32, 60), "'transformer.layers.1.3.net.2.weight' has shape (32, 60)"),
    ("pos_embedding", (1, 16, 40), "pos_embedding width 40 contradicts"),
    ("pos_embedding", (1, 15, 32), "not a square grid"),
    ("to_patch_embedding.1.weight", (32, 50), "not P*P*C"),
    ("transformer.layers.0.0.Wqkv.weight", (47, 32), "Wqkv has 47 rows"),
], ids=["mlp-width", "pos-width", "tokens", "patch-dim", "wqkv-rows"])
def test_contradicting_shapes(capsys, tmp_path, state, key, shape, needle):
    state[key] = torch.randn(shape)
    _expect(capsys, tmp_path, [_save(tmp_path, state)], needle)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights(capsys, tmp_path, state, value):
    state["transformer.layers.0.3.net.0.weight"][3, 5] = value
    _expect(capsys, tmp_path, [_save(tmp_path, state)], "'transformer.layers.0.3.net.0.weight' has NaN or Inf")


def test_multi_head_needs_heads(capsys, tmp_path, checkpoint):
    path, _ = checkpoint(MH)
    _expect(capsys, tmp_path, [path], "cannot be inferred", "pass --heads H")


def test_heads_contradiction(capsys, tmp_path, checkpoint):
    path, _ = checkpoint(MQ)
    _expect(capsys, tmp_path, [path, "--heads", "8"], "--heads 8 contradicts", "drop --heads")


def test_image_size_contradiction(capsys, tmp_path, checkpoint):
    path, _ = checkpoint(MQ)
    _expect(capsys, tmp_path, [path, "--image-size", "224"], "--image-size 224 contradicts", "pass 28")


def test_unknown_target(capsys, tmp_path, checkpoint):
    path, _ = checkpoint(MQ)
    _expect(capsys, tmp_path, [path, "--target", "riscv9"], "unknown target 'riscv9'", "bmvcc targets")


def test_bad_batch(capsys, tmp_path, checkpoint):
    path, _ = checkpoint(MQ)
    _expect(capsys, tmp_path, [path, "--batch", "0"], "invalid value for '--batch'")
