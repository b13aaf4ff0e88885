"""What the machine a run is on can do fast: bf16 matmuls need AVX512-BF16 or AMX on a CPU.

Without either, torch emulates bf16 on the CPU, and a step with --bf16 is several times slower than in
fp32, so the demo picks fp32 there and `unisd train --bf16` says so once.
"""
from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty where /proc/cpuinfo does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fast_bf16_cpu() -> bool:
    """True when the CPU computes bf16 natively, or when its flags cannot be read (then trust the user)."""
    flags = cpu_flags()
    return not flags or any(f in flags for f in BF16_FLAGS)


def machine() -> dict[str, object]:
    """The CPU a measurement ran on, for benchmark results."""
    import os

    flags = cpu_flags()
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "native_bf16": fast_bf16_cpu(),
            "bf16_flags": sorted(f for f in flags if f in BF16_FLAGS), "avx512": "avx512f" in flags,
            "avx2": "avx2" in flags}
