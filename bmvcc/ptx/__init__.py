"""A PTX emulator: runs the PTX NVRTC produces for bmvcc's CUDA kernels on the CPU, with numpy.

parse.py: PTX text -> kernels (declarations, instructions with their source lines, labels);
machine.py: a batch of CTAs executed in lockstep (registers are numpy arrays over all threads), memory
spaces with bounds checks, divergence with reconvergence; ops_*.py: instruction semantics by family;
races.py: the shared- and global-memory race detectors; launches.py: kernel launches from TVM's host code;
verify.py: an artifact's launches against their definitions; issue.py: the instructions they execute (bmvcc report).
"""

from .machine import EmulationError, Launch, run_kernel
from .parse import parse_ptx

__all__ = ["EmulationError", "Launch", "parse_ptx", "run_kernel"]
