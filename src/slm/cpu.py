"""What this CPU is, and whether bf16 pays on it: the measured probe behind ``--dtype auto``.

The flags alone do not say it: an AVX2-only CPU runs bf16 matrix products ~50x slower than fp32 (PyTorch
converts in software), one with AVX512-BF16 ~2x faster and one with AMX more, and a virtual machine may
report flags its host does not honour. So ``auto`` times the same matrix product in both precisions once
per CPU (a fraction of a second) and keeps the answer in the cache directory, keyed by the CPU's name, its
flags, the torch version, the thread count and any instruction-set cap in force (``ATEN_CPU_CAPABILITY``,
``ONEDNN_MAX_CPU_ISA``, ``MKL_ENABLE_INSTRUCTIONS``: a capped run has other kernels than an uncapped one).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from functools import cache

import torch

from slm.files import cache_dir

# Flags that decide the fast paths: AVX2/FMA (fp32 matmuls, the native step), F16C (its fp16 weights),
# AVX-512 and AVX512-BF16/AMX (bf16 matmuls).
FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
# bf16 matmuls at least this much faster than fp32: training gains despite autocast's casts (the bar sits
# between two measured training points: docs/training-on-cpu.md, "On an AMD EPYC with AVX512-BF16").
BF16_MIN_SPEEDUP = 1.5
# Square matrices of PROBE_SIZE, timed in PROBE_ROUNDS turns of about ROUND_SECONDS per precision, each keeping
# its best turn: large and repeated enough that the reading is steady from one process to the next (same doc).
PROBE_SIZE, PROBE_ROUNDS, ROUND_SECONDS = 512, 5, 0.02
ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")  # libraries' caps; ATen's shows in its capability


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


def seconds_per_matmul(a: torch.Tensor, seconds: float) -> float:
    """Mean seconds of ``a @ a`` over about ``seconds`` (at least one product)."""
    start, runs = time.perf_counter(), 0
    while runs < 1 or time.perf_counter() - start < seconds:
        a @ a
        runs += 1
    return (time.perf_counter() - start) / runs


def measure_bf16_speedup(size: int = PROBE_SIZE) -> float:
    """fp32 seconds / bf16 seconds of the same ``size``-square product. The precisions take turns and each keeps
    its best turn: another process slowing the machine only ever adds time, and it adds it to both."""
    matrices = {dtype: torch.randn(size, size).to(dtype) for dtype in (torch.float32, torch.bfloat16)}
    for a in matrices.values():
        a @ a  # warm-up: first-call dispatch and any kernel JIT
    best = dict.fromkeys(matrices, math.inf)
    for _ in range(PROBE_ROUNDS):
        for dtype, a in matrices.items():
            best[dtype] = min(best[dtype], seconds_per_matmul(a, ROUND_SECONDS))
    return best[torch.float32] / best[torch.bfloat16]


def probe_key(info: CpuInfo) -> str:
    caps = [torch.backends.cpu.get_cpu_capability()] + [os.environ.get(name, "") for name in ISA_CAPS]
    text = f"{info.model}|{cpuinfo_field('flags')}|{torch.__version__}|{info.threads}|{PROBE_SIZE}|{caps}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@cache
def bf16_speedup() -> float:
    """fp32 seconds / bf16 seconds of a matrix product here (measured once per CPU, cached)."""
    info = cpu_info()
    path = cache_dir() / f"cpu-probe-{probe_key(info)}.json"
    try:
        return float(json.loads(path.read_text())["bf16_speedup"])
    except (OSError, ValueError, KeyError):
        pass
    speedup = measure_bf16_speedup()
    with contextlib.suppress(OSError):  # a read-only cache: measure again next time
        path.write_text(json.dumps({"cpu": info.model, "threads": info.threads, "torch": torch.__version__,
                                    "bf16_speedup": speedup}) + "\n")
    return speedup


def bf16_pays() -> bool:
    """Whether this CPU should train in bf16 (and run Muon's iteration in it): measured, not assumed."""
    return bf16_speedup() >= BF16_MIN_SPEEDUP
