"""What this machine offers: physical CPU cores and CUDA GPUs, probed without torch or cupy."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import lru_cache


@lru_cache(maxsize=1)
def physical_cores() -> int:
    """Physical cores this process may use (hyper-threads of one core count once).

    Compute-bound GEMM/conv kernels gain nothing from a core's second hardware thread and lose
    to the contention, so ONNX Runtime's intra-op pool is sized to physical cores.
    """
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    for cpu in allowed:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            with open(base + "physical_package_id") as f:
                package = f.read().strip()
            with open(base + "core_id") as f:
                core = f.read().strip()
        except OSError:
            return len(allowed)
        cores.add((package, core))
    return max(1, len(cores))


@lru_cache(maxsize=1)
def cuda_device_count() -> int:
    """Number of CUDA GPUs the driver reports; 0 without a driver (asked through libcuda)."""
    name = ctypes.util.find_library("cuda") or "libcuda.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return 0
    count = ctypes.c_int(0)
    try:
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
    except AttributeError:
        return 0
    return int(count.value)
