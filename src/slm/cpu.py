"""What this CPU is, and whether bf16 pays on it: the measured probe behind ``--dtype auto``.

The flags alone do not say it: an AVX2-only CPU runs bf16 matrix products several times slower than fp32
(PyTorch converts in software), one with AVX512-BF16/AMX several times faster, and a virtual machine may
report flags its host does not honour. So ``auto`` times the same matrix product in both precisions once
per CPU (a fraction of a second) and keeps the answer in the cache directory, keyed by the CPU's name, its
flags, the torch version and the thread count.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass
from functools import cache

import torch

# Flags that decide the fast paths: AVX2/FMA (fp32 matmuls, the native step), F16C (its fp16 weights),
# AVX-512 and AVX512-BF16/AMX (bf16 matmuls).
FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
BF16_MIN_SPEEDUP = 2.0  # bf16 matmuls this much faster than fp32: training gains despite autocast's casts
PROBE_SIZE, PROBE_SECONDS = 256, 0.1  # square matrices; each precision is timed for about this long


@dataclass(frozen=True)
class CpuInfo:
    model: str
    logical_cpus: int
    threads: int  # torch's intra-op threads, what training and decoding use
    features: tuple[str, ...]  # those of FEATURES this CPU has


def cpuinfo_field(name: str) -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            line = next((line for line in f if line.startswith(name)), "")
    except OSError:
        return ""
    return line.partition(":")[2].strip()


def cpu_info() -> CpuInfo:
    flags = set(cpuinfo_field("flags").split())
    return CpuInfo(model=cpuinfo_field("model name") or platform.processor() or platform.machine(),
                   logical_cpus=os.cpu_count() or 1, threads=torch.get_num_threads(),
                   features=tuple(f for f in FEATURES if f in flags))


def seconds_per_matmul(dtype: torch.dtype) -> float:
    a = torch.randn(PROBE_SIZE, PROBE_SIZE).to(dtype)
    b = torch.randn(PROBE_SIZE, PROBE_SIZE).to(dtype)
    a @ b  # warm-up: first-call dispatch and any kernel JIT
    start, runs = time.perf_counter(), 0
    while runs < 3 or time.perf_counter() - start < PROBE_SECONDS:
        a @ b
        runs += 1
    return (time.perf_counter() - start) / runs


def probe_key(info: CpuInfo) -> str:
    text = f"{info.model}|{cpuinfo_field('flags')}|{torch.__version__}|{info.threads}|{PROBE_SIZE}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@cache
def bf16_speedup() -> float:
    """fp32 seconds / bf16 seconds of a 256x256x256 matrix product here (measured once per CPU, cached)."""
    from slm.native import cache_dir  # the same cache directory as the native step's builds

    info = cpu_info()
    path = cache_dir() / f"cpu-probe-{probe_key(info)}.json"
    try:
        return float(json.loads(path.read_text())["bf16_speedup"])
    except (OSError, ValueError, KeyError):
        pass
    speedup = seconds_per_matmul(torch.float32) / seconds_per_matmul(torch.bfloat16)
    with contextlib.suppress(OSError):  # a read-only cache: measure again next time
        path.write_text(json.dumps({"cpu": info.model, "threads": info.threads, "torch": torch.__version__,
                                    "bf16_speedup": speedup}) + "\n")
    return speedup


def bf16_pays() -> bool:
    """Whether this CPU should train in bf16 (and run Muon's iteration in it): measured, not assumed."""
    return bf16_speedup() >= BF16_MIN_SPEEDUP
