"""The size of TVM's CPU thread pool: one thread per physical core this process may run on.

TVM sizes its pool, when its first parallel kernel runs, from TVM_NUM_THREADS (or OMP_NUM_THREADS),
else as hardware_concurrency() / 2 on x86-64, assuming two hyperthreads per core: on a machine
without SMT (a 2-vCPU VM) that is half the cores, one of two, and every parallel kernel runs alone.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_tvm_threads() -> None:
    """Set TVM_NUM_THREADS to physical_cores() unless the user set it (or OMP_NUM_THREADS)."""
    if "TVM_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(physical_cores())


def physical_cores() -> int:
    """Distinct (package, core) pairs among the CPUs this process may use (each CPU counted as a
    core where the kernel does not describe the topology)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            return len(cpus)
    return len(cores)
