"""How steady `--dtype auto`'s bf16 probe is, and what it reads under instruction-set caps.

    python benchmarks/bf16_probe.py [--repeats 6] [--caps none,AVX512_CORE,AVX2] [--json F]

For each cap (``ONEDNN_MAX_CPU_ISA``, with ``ATEN_CPU_CAPABILITY`` and ``MKL_ENABLE_INSTRUCTIONS`` to match for
AVX2: the way to see on one machine what an older CPU's kernels give), a fresh process measures fp32 / bf16
seconds of a square matrix product ``--repeats`` times in two ways: one after the other, 0.1 s each (the probe
up to commit 7a0a139), and the precisions in turns keeping each one's best (``slm.cpu.measure_bf16_speedup``), at
256 and 512. A probe whose readings straddle ``slm.cpu.BF16_MIN_SPEEDUP`` flips `auto` at random.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from slm import cpu

SIZES = (256, 512)
CAPS = {"AVX2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}  # beside oneDNN's own cap


def one_after_the_other(size: int) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size).bfloat16()
    a @ a, b @ b
    return cpu.seconds_per_matmul(a, 0.1) / cpu.seconds_per_matmul(b, 0.1)


def in_turns(size: int) -> float:
    return cpu.measure_bf16_speedup(size)


def readings(repeats: int) -> dict:
    return {f"{method.__name__} {size}": [round(method(size), 3) for _ in range(repeats)]
            for method in (one_after_the_other, in_turns) for size in SIZES}


def measure_under(cap: str, repeats: int) -> dict:
    env = dict(os.environ)
    if cap != "none":
        env |= {"ONEDNN_MAX_CPU_ISA": cap} | CAPS.get(cap, {})
    out = subprocess.run([sys.executable, __file__, "--child", str(repeats)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--caps", default="none,AVX512_CORE,AVX2", help="ONEDNN_MAX_CPU_ISA values; none: no cap")
    parser.add_argument("--json", type=Path, help="also write the readings here")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(readings(args.child)))
        return
    info = cpu.cpu_info()
    print(f"{info.model} ({info.threads} threads, {' '.join(info.features)}); auto picks bf16 at >= "
          f"{cpu.BF16_MIN_SPEEDUP:g}x\n")
    print("| cap | probe | size | fp32 / bf16 readings | min-max |\n|---|---|---|---|---|")
    results = {}
    for cap in args.caps.split(","):
        results[cap] = measure_under(cap, args.repeats)
        for name, values in results[cap].items():
            method, size = name.split()
            print(f"| {cap} | {method.replace('_', ' ')} | {size} | {' '.join(f'{v:.2f}' for v in values)} | "
                  f"{min(values):.2f}-{max(values):.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"cpu": info.model, "features": list(info.features), "threads": info.threads,
                                         "min_speedup": cpu.BF16_MIN_SPEEDUP, "readings": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
