"""Runs a compiled artifact as a device does (bmvcc.runtime: numpy and tvm_ffi only), under emulation in
tests/test_aarch64_emulated.py: prints platform.machine(), then saves the logits of IMAGES.npy to OUT.npy.

Usage: python aarch64_driver.py ARTIFACT IMAGES.npy OUT.npy
"""

import platform
import sys

import numpy as np

print(platform.machine(), flush=True)  # before loading: a refused artifact still shows where it ran

from bmvcc import runtime  # noqa: E402  after the print above

artifact, images, out = sys.argv[1:]
np.save(out, runtime.load(artifact)(np.load(images)))
