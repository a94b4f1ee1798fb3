"""Seconds per compiled bf16 training step with slm.training_kernels' paths on and off, side by side in one run.

    python benchmarks/training_kernels.py --data runs/v4/data [--preset cpu-7m] [--rounds 7] [--json F]
        [--variants "pytorch:0:0,attention:128:0,both:128:1024,forward:128:1024:1"] [--fp32]

Each variant is ``name:QUERY_BLOCK:LOSS_CHUNK[:BLOCKED_FORWARD]`` (0 = PyTorch's own path; the forward is
flash attention unless the fourth field is 1, and only with QUERY_BLOCK > 0). Builds the run `slm train --preset P
--dtype bf16 --compile` would for every variant (2 threads, scratch --out dirs), compiles each with its sizes
set, then takes turns: each round runs 3 steps of every variant with that variant's sizes set again, so the
compiled code of each is the one it was traced with (torch.compile guards on the sizes) and a machine that
slows down slows all alike. --fp32 adds fp32 eager, the issue's baseline. Prints the median seconds a step.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

from step_time import timed
from train_profile import build

from slm.cpu import cpu_info
from slm.training_kernels import TrainingKernels

DEFAULT_VARIANTS = "pytorch:0:0,attention:128:0,loss:0:1024,both:128:1024,forward:128:1024:1"
Sizes = tuple[int, int, int]  # QUERY_BLOCK, LOSS_CHUNK, BLOCKED_FORWARD


def parse_variants(text: str) -> dict[str, Sizes]:
    variants = {}
    for item in text.split(","):
        name, block, chunk, *forward = item.split(":")
        variants[name] = (int(block), int(chunk), int(forward[0]) if forward else 0)
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a directory made by `slm prepare`")
    parser.add_argument("--preset", default="cpu-7m")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--fp32", action="store_true", help="also time fp32 eager (the issue's baseline)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    variants: dict[str, Sizes | None] = dict(parse_variants(args.variants))
    scratch = Path(tempfile.mkdtemp(prefix="slm-kernels-"))
    try:
        trainers = {}
        for name, (block, chunk, forward) in variants.items():
            trainers[name] = build(args.data.resolve(), scratch / name, args.preset, "bf16", True)
            trainers[name].model.kernels = TrainingKernels(block, chunk, bool(forward))
            timed(trainers[name], 1)  # compiles with these sizes
        if args.fp32:
            variants["fp32 eager"] = None
            trainers["fp32 eager"] = build(args.data.resolve(), scratch / "fp32", args.preset, "fp32", False)
            timed(trainers["fp32 eager"], 1)
        times: dict[str, list[float]] = {name: [] for name in trainers}
        for _ in range(args.rounds):
            for name, trainer in trainers.items():
                times[name].append(timed(trainer, 3))
        tokens = next(iter(trainers.values())).tokens_per_step
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    base_name = "fp32 eager" if args.fp32 else next(iter(median))
    base = median[base_name]
    info = cpu_info()
    print(f"{args.preset} on {info.model} ({info.threads} threads, {' '.join(info.features)}), {tokens:,} tokens a "
          f"step, median of {args.rounds} rounds of 3 steps\n")
    print(f"| variant | QUERY_BLOCK | LOSS_CHUNK | forward | s a step | tokens/s | vs {base_name} |\n"
          "|---|---|---|---|---|---|---|")
    for name, sizes in variants.items():
        block, chunk, forward = sizes if sizes else ("-", "-", 0)
        forward_name = "blocked" if forward and block else "flash" if block else "-"
        print(f"| {name} | {block} | {chunk} | {forward_name} | {median[name]:.3f} | {tokens / median[name]:,.0f} | "
              f"{base / median[name]:.2f}x |")
    if args.json:
        rows = [{"variant": n, "sizes": variants[n], "seconds": times[n], "median": median[n]} for n in variants]
        args.json.write_text(json.dumps({"preset": args.preset, "cpu": info.model, "features": info.features,
                                         "tokens_per_step": tokens, "rounds": args.rounds, "variants": rows},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
