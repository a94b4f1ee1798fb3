"""Seconds per training step for fp32 / bf16, eager / torch.compile, measured side by side in one run.

    python benchmarks/step_time.py --data runs/v4/data [--preset cpu-7m] [--rounds 5] [--json F]

Builds the four runs `slm train --preset P --dtype D [--compile]` would (the preset's recipe, 2 threads, scratch
--out dirs), times each one's first step (for compile: the compilation), then takes turns: each round runs 3
steps of every variant, so a machine that slows down slows all four alike. Prints the median seconds a step,
tokens/s and the ratio to fp32 eager.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from train_profile import build

from slm.cpu import cpu_info
from slm.train import Trainer

VARIANTS = (("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True))


def timed(trainer: Trainer, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a directory made by `slm prepare`")
    parser.add_argument("--preset", default="cpu-7m")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="slm-step-time-"))
    try:
        trainers = {v: build(args.data.resolve(), scratch / f"{v[0]}-{v[1]}", args.preset, *v) for v in VARIANTS}
        first = {v: timed(t, 1) for v, t in trainers.items()}  # compile happens here
        times: dict = {v: [] for v in VARIANTS}
        for _ in range(args.rounds):
            for v, trainer in trainers.items():
                times[v].append(timed(trainer, 3))
        tokens = next(iter(trainers.values())).tokens_per_step
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    median = {v: statistics.median(ts) for v, ts in times.items()}
    info = cpu_info()
    print(f"{args.preset} on {info.model} ({info.threads} threads, {' '.join(info.features)}), {tokens:,} tokens a "
          f"step, median of {args.rounds} rounds of 3 steps\n")
    print("| precision | compile | first step s | s a step | tokens/s | vs fp32 eager |\n|---|---|---|---|---|---|")
    for v in VARIANTS:
        print(f"| {v[0]} | {'yes' if v[1] else 'no'} | {first[v]:.1f} | {median[v]:.3f} | {tokens / median[v]:,.0f} | "
              f"{median[('fp32', False)] / median[v]:.2f}x |")
    if args.json:
        rows = [{"dtype": v[0], "compile": v[1], "first_step_s": first[v], "step_s": median[v], "rounds": times[v]}
                for v in VARIANTS]
        args.json.write_text(json.dumps({"preset": args.preset, "cpu": info.model, "features": list(info.features),
                                         "tokens_per_step": tokens, "variants": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
