"""Compiled artifacts against the PyTorch model they came from, and the config-inference table.

Each compile takes 10-20 s, so every artifact is built once per module (the `compiled` fixture) and
shared by the tests that read it.
"""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch

from bmvcc import runtime
from bmvcc.checkpoint import infer_config
from bmvcc.driver import CompileOptions, compile_model
from bmvcc.frontend import load_source, resolve_batch
from bmvcc.errors import BmvccError
from bmvcc.model import BitMedViT

from conftest import FAMILIES, cli_error, family_id, small_config

BATCH = 2  # > 1: batch handling is part of what is checked
IMAGES = 5  # not a multiple of BATCH: the runtime's padded last chunk is checked too

# Tolerance on logits, relative to the largest |logit| of the reference. The compiled graph computes
# the same float32 math in another order (fused reductions over K <= 256 terms, fast-math exp/erf
# polynomials instead of ATen's): ~1e-6 relative per op, <= 1e-5 on logits without quantizers. The
# quantizers amplify that only where xn * s_x lands within ~1e-5 of a .5 rounding boundary: that int8
# code then differs by one, which moves that token's K-term dot product by max|xn|/127 * mean|W|,
# ~1/(127 sqrt(K)) ~ 1e-3 of its scale. Measured over 64 random images per family (the four
# families, integer W2A8 kernels and --no-bitlinear float path): at most 2.3e-3; without quantized
# attention (fp_attn) 1e-4. 1e-2 keeps a 4x margin and still fails on any real bug (a wrong
# transpose, mask, scale or rounding rule moves logits by O(1)).
RTOL_LOGITS = 1e-2

CASES = {
    **{family_id(mq, fp): small_config(mq, fp) for mq, fp in FAMILIES},
    "rgb": small_config(True, False, channels=3, num_classes=7),
    "img32-p8": small_config(False, False, image_size=32, patch_size=8, dim=48, heads=3, mlp_dim=96),
    "matcher": small_config(True, False, matcher_dim=16),
}


def _compile(source, outdir, **options):
    return compile_model(source, outdir, CompileOptions(**{"target": "host", "batch": BATCH, **options}))


def compile_case(checkpoint, directory, case: str, seed: int, target: str = "host"):
    """CASES[case]'s model (weights from `seed`) compiled for `target` into DIRECTORY/case: (that path, the model)."""
    cfg = CASES[case]
    path, model = checkpoint(cfg, seed=seed)
    _compile(path, directory / case, target=target, heads=None if cfg.multi_query else cfg.heads)
    return directory / case, model


@pytest.fixture(scope="module")
def compiled(checkpoint, tmp_path_factory):
    """compiled(case) -> (CompiledModel, reference model); each case compiles once per module."""
    cache = {}

    def get(case: str):
        if case not in cache:
            out, model = compile_case(checkpoint, tmp_path_factory.mktemp("artifacts"), case, seed=len(cache) + 1)
            cache[case] = (runtime.load(out), model)
        return cache[case]

    return get


def _images(shape, seed: int) -> np.ndarray:
    # Normalized-pixel range, like (pixel / 255 - 0.5) / 0.5.
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, size=(IMAGES, *shape)).astype(np.float32)


def _misaligned(x: np.ndarray) -> np.ndarray:
    """A copy of `x` 16 bytes past a 64-byte boundary (numpy only guarantees 16): the runtime must
    not hand it to kernels that use aligned vector loads (it segfaulted for patch size 8)."""
    buffer = np.empty(x.nbytes + 80, np.uint8)
    start = -buffer.ctypes.data % 64 + 16
    out = buffer[start : start + x.nbytes].view(x.dtype).reshape(x.shape)
    out[...] = x
    return out


def _check_logits(got: np.ndarray, ref: np.ndarray) -> None:
    scale = float(np.abs(ref).max())
    err = float(np.abs(got - ref).max())
    assert got.shape == ref.shape
    assert err <= RTOL_LOGITS * scale, f"max |diff| {err:.3g} > {RTOL_LOGITS} * {scale:.3g}"
    # Same class wherever the reference's top-2 margin exceeds what the tolerance allows to move.
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * RTOL_LOGITS * scale
    assert clear.sum() >= len(ref) // 2, "reference logits too close to test argmax; change the seed"
    np.testing.assert_array_equal(got.argmax(1)[clear], ref.argmax(1)[clear])


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_matches_pytorch(compiled, case):
    model, ref_model = compiled(case)
    cfg = CASES[case]
    x = _images((cfg.channels, cfg.image_size, cfg.image_size), seed=7)
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(x)).numpy()
    got = model(x)
    _check_logits(got, ref)
    np.testing.assert_array_equal(model(_misaligned(x)), got)
    assert model.metadata["config"] == cfg.to_dict()
    assert model.metadata["input"]["shape"] == [BATCH, cfg.channels, cfg.image_size, cfg.image_size]


def test_no_bitlinear_matches_pytorch(checkpoint, tmp_path):
    """--no-bitlinear keeps BitLinear as float matmuls: the same logits within the same tolerance."""
    cfg = CASES["mq-bit"]
    path, ref_model = checkpoint(cfg, seed=11)
    _compile(path, tmp_path / "out", bitlinear=False)
    x = _images((1, 28, 28), seed=3)
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(x)).numpy()
    _check_logits(runtime.load(tmp_path / "out")(x), ref)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="builds for an x86 CPU (Haswell)")
def test_host_with_another_cpu_matches_pytorch(checkpoint, tmp_path):
    """A TargetSpec in CompileOptions (Python API): this machine's cores with Haswell's code (AVX2, which every x86
    CI machine runs; the W2A8 kernels on their AVX2 backend): the same logits within the same tolerance."""
    from bmvcc.targets.cpu import host

    target = host("haswell")
    cfg = CASES["mq-bit"]
    path, ref_model = checkpoint(cfg, seed=12)
    compile_model(path, tmp_path / "out", CompileOptions(target=target, batch=BATCH))
    model = runtime.load(tmp_path / "out")
    assert model.metadata["target"]["tvm"]["mcpu"] == "haswell"
    x = _images((1, 28, 28), seed=4)
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(x)).numpy()
    _check_logits(model(x), ref)


class SmallCNN(torch.nn.Module):
    """Not a BitMedViT: compiled through the .pt2 (torch.export program) path."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8 * 8 * 8, 5)

    def forward(self, x):
        x = torch.nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc(x.flatten(1))


def _cnn() -> SmallCNN:
    torch.manual_seed(0)
    cnn = SmallCNN()
    with torch.no_grad():  # non-trivial running statistics
        cnn.bn.running_mean.uniform_(-0.5, 0.5)
        cnn.bn.running_var.uniform_(0.5, 2.0)
    return cnn.eval()


def test_pt2_program_compiles_and_matches(tmp_path):
    cnn = _cnn()
    batch = torch.export.Dim("batch")
    ep = torch.export.export(cnn, (torch.zeros(3, 3, 16, 16),), dynamic_shapes=({0: batch},))
    torch.export.save(ep, tmp_path / "cnn.pt2")
    report = _compile(tmp_path / "cnn.pt2", tmp_path / "out")  # batch 2: a dynamic batch re-exports
    assert report.metadata["config"] is None and report.metadata["num_classes"] == 5
    assert report.metadata["input"]["shape"] == [BATCH, 3, 16, 16]
    x = _images((3, 16, 16), seed=5)
    with torch.no_grad():
        ref = cnn(torch.from_numpy(x)).numpy()
    # No quantizers here: only fp32 reassociation (K <= 72 per conv output, 512 in fc).
    np.testing.assert_allclose(runtime.load(tmp_path / "out")(x), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_pt2_static_batch(tmp_path, capsys):
    ep = torch.export.export(_cnn(), (torch.zeros(3, 3, 16, 16),))
    torch.export.save(ep, tmp_path / "static.pt2")
    source = load_source(tmp_path / "static.pt2")
    assert resolve_batch(source, None) == 3 and resolve_batch(source, 3) == 3
    line = cli_error(capsys, ["compile", str(tmp_path / "static.pt2"), "-o", str(tmp_path / "out"), "--batch", "2"])
    assert "fixed batch of 3" in line and "drop --batch" in line
    assert not (tmp_path / "out").exists()


# ---- config inference: shapes -> ViTConfig ------------------------------------------------------

INFERENCE = [
    # (config written, --heads, --image-size, expected fields or error substring)
    (small_config(True, False), None, None, {}),
    (small_config(True, True), None, 28, {}),
    (small_config(False, False), 4, None, {}),
    (small_config(False, True), 2, 28, {"heads": 2}),  # multi-head: heads come from --heads
    (small_config(True, False, channels=3, num_classes=7), None, None, {}),
    (small_config(True, False, image_size=32, patch_size=8, dim=48, heads=3, mlp_dim=96), None, None, {}),
    (small_config(True, False, image_size=224, patch_size=16, dim=64, depth=1, heads=8), None, None, {}),
    (small_config(True, False, patch_size=4, depth=3, heads=2), None, None, {}),
    (small_config(True, False, matcher_dim=49), None, None, {}),
    (small_config(True, False, heads=8), 8, None, {}),  # consistent --heads accepted
    (small_config(False, False), None, None, "pass --heads H"),
    (small_config(False, False), 5, None, "does not divide dim"),
    (small_config(True, False), 2, None, "--heads 2 contradicts Wqkv"),
    (small_config(True, False), None, 32, "--image-size 32 contradicts the checkpoint"),
    (small_config(False, True), 4, 56, "--image-size 56 contradicts the checkpoint"),
]


@pytest.mark.parametrize("cfg, heads, image_size, expected", INFERENCE,
                         ids=[f"{family_id(c.multi_query, c.fp_attn)}-{c.image_size}-{c.patch_size}-{c.channels}ch"
                              f"-h{h}-i{i}" for c, h, i, _ in INFERENCE])
def test_infer_config(cfg, heads, image_size, expected):
    state = BitMedViT(cfg).state_dict()
    if isinstance(expected, str):
        with pytest.raises(BmvccError, match=expected.replace("--", r"\-\-")):
            infer_config(state, heads=heads, image_size=image_size)
        return
    import dataclasses

    assert infer_config(state, heads=heads, image_size=image_size) == dataclasses.replace(cfg, **expected)
