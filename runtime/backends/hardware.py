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


#: /proc/cpuinfo flags of native bf16 arithmetic: AVX512-BF16 (Cooper Lake, Zen 4/5) and AMX.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=1)
def cpu_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU computes bf16 dot products natively (read from ``cpuinfo``'s flags).

    Where it does, OpenVINO's bf16 matmuls and convolutions run ~1.5x faster than fp32; where
    it does not, bf16 would be emulated and the CPU backends stay in fp32. Read from the flags,
    not by importing OpenVINO, so ``backend="auto"`` decides in microseconds.
    """
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return any(flag in flags for flag in BF16_FLAGS)
    except OSError:
        pass
    return False
