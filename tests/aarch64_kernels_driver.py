"""Runs single kernels of one compiled library as a device would (numpy, tvm_ffi and the TVM runtime only), under
emulation in tests/test_aarch64_kernels.py: prints platform.machine(), then for every NAME.npz in INPUTS calls the
library's function NAME on the file's arrays (arr_0, arr_1, ...: its inputs, then its outputs) and saves them all,
as the call left them, to OUTPUTS/NAME.npz.

Usage: python aarch64_kernels_driver.py LIBRARY.so INPUTS OUTPUTS
"""

import platform
import sys
from pathlib import Path

import numpy as np

print(platform.machine(), flush=True)

from bmvcc.runtime import _ALIGNMENT, _aligned, _ffi, _load_runtime_libraries  # noqa: E402  after the print above

library, inputs, outputs = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
_load_runtime_libraries("cpu")
ffi = _ffi()
module = ffi.load_module(library)
for case in sorted(inputs.glob("*.npz")):
    with np.load(case) as data:
        args = [_aligned(data[f"arr_{i}"]) for i in range(len(data.files))]  # TVM assumes 64-byte aligned tensors
    module[case.stem](*(ffi.from_dlpack(a, require_alignment=_ALIGNMENT) for a in args))
    np.savez(outputs / case.name, *args)
