"""Training on this CPU, three ways: seconds a step by precision and compile, the same with slm's training
kernels on and off, and whether bf16 costs validation loss.

    python benchmarks/step_time.py --data DIR [--preset cpu-7m] [--rounds 5] [--json F]
    python benchmarks/step_time.py --data DIR --kernels [--variants V,...] [--fp32] [--rounds 7] [--json F]
    python benchmarks/step_time.py --data DIR --loss-check [--steps 300] [--compile] [--json F]

Default: builds the four runs `slm train --preset P --dtype fp32|bf16 [--compile]` would (the preset's recipe,
2 threads, scratch --out dirs), times each one's first step (for compile: the compilation), then takes turns:
each round runs 3 steps of every variant, so a machine that slows down slows all of them alike. Prints the
median seconds a step, tokens/s and the ratio to fp32 eager.

--kernels: compiled bf16 steps with slm.training_kernels' paths set per variant, timed the same way. Each of
--variants is ``name:QUERY_BLOCK:LOSS_CHUNK[:BLOCKED_FORWARD]`` (0 = PyTorch's own path; the forward is flash attention
unless the fourth field is 1, and only with QUERY_BLOCK > 0), given to the model as a TrainingKernels. --fp32
adds fp32 eager as the baseline.

--loss-check: the same run twice with `slm train` (fp32 eager, and bf16, compiled with --compile), the same
seed and so the same windows, scoring the same 64 validation windows every 100 steps: how far bf16's
validation bits/byte is from fp32's (the goal: within 0.01 over 300 steps), and the tokens/s of each (medians
of the logged steps, the first left out).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train_profile import build

from slm.cpu import bf16_speedup, cpu_info
from slm.train import Trainer
from slm.training_kernels import TrainingKernels

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = (("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True))
DEFAULT_KERNELS = "pytorch:0:0,attention:128:0,loss:0:1024,both:128:1024,forward:128:1024:1"


def timed(trainer: Trainer, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    return (time.perf_counter() - started) / steps


def in_turns(trainers: dict, rounds: int) -> dict:
    """Median seconds a step of each trainer, 3 steps of each in turn per round, and every round's figure."""
    times: dict = {name: [] for name in trainers}
    for _ in range(rounds):
        for name, trainer in trainers.items():
            times[name].append(timed(trainer, 3))
    return {name: (statistics.median(ts), ts) for name, ts in times.items()}


def machine_line(preset: str, tokens: int, rounds: int) -> str:
    info = cpu_info()
    return (f"{preset} on {info.model} ({info.threads} threads, {' '.join(info.features)}), {tokens:,} tokens a "
            f"step, median of {rounds} rounds of 3 steps\n")


# ---- precision and compile ----------------------------------------------------------------------------
def precisions(args: argparse.Namespace, scratch: Path) -> dict:
    trainers = {v: build(args.data.resolve(), scratch / f"{v[0]}-{v[1]}", args.preset, *v) for v in PRECISIONS}
    first = {v: timed(t, 1) for v, t in trainers.items()}  # compile happens here
    median = in_turns(trainers, args.rounds)
    tokens = next(iter(trainers.values())).tokens_per_step
    print(machine_line(args.preset, tokens, args.rounds))
    print("| precision | compile | first step s | s a step | tokens/s | vs fp32 eager |\n|---|---|---|---|---|---|")
    base = median[("fp32", False)][0]
    for v in PRECISIONS:
        print(f"| {v[0]} | {'yes' if v[1] else 'no'} | {first[v]:.1f} | {median[v][0]:.3f} | "
              f"{tokens / median[v][0]:,.0f} | {base / median[v][0]:.2f}x |")
    rows = [{"dtype": v[0], "compile": v[1], "first_step_s": first[v], "step_s": median[v][0],
             "rounds": median[v][1]} for v in PRECISIONS]
    return {"preset": args.preset, "cpu": cpu_info().model, "features": list(cpu_info().features),
            "tokens_per_step": tokens, "variants": rows}


# ---- training kernels on and off ----------------------------------------------------------------------
def parse_kernels(text: str) -> dict[str, TrainingKernels]:
    variants = {}
    for item in text.split(","):
        name, block, chunk, *forward = item.split(":")
        variants[name] = TrainingKernels(int(block), int(chunk), bool(int(forward[0])) if forward else False)
    return variants


def kernels(args: argparse.Namespace, scratch: Path) -> dict:
    variants: dict[str, TrainingKernels | None] = dict(parse_kernels(args.variants))
    trainers = {}
    for name, chosen in variants.items():
        trainers[name] = build(args.data.resolve(), scratch / name, args.preset, "bf16", True)
        trainers[name].model.kernels = chosen
        timed(trainers[name], 1)  # compiles with these paths
    if args.fp32:
        variants["fp32 eager"] = None
        trainers["fp32 eager"] = build(args.data.resolve(), scratch / "fp32", args.preset, "fp32", False)
        timed(trainers["fp32 eager"], 1)
    median = in_turns(trainers, args.rounds)
    tokens = next(iter(trainers.values())).tokens_per_step
    base_name = "fp32 eager" if args.fp32 else next(iter(median))
    print(machine_line(args.preset, tokens, args.rounds))
    print(f"| variant | query block | loss chunk | forward | s a step | tokens/s | vs {base_name} |\n"
          "|---|---|---|---|---|---|---|")
    for name, k in variants.items():
        block, chunk = (k.query_block, k.loss_chunk) if k else ("-", "-")
        forward = "blocked" if k and k.blocked_forward and k.query_block else "flash" if k and k.query_block else "-"
        print(f"| {name} | {block} | {chunk} | {forward} | {median[name][0]:.3f} | {tokens / median[name][0]:,.0f} | "
              f"{median[base_name][0] / median[name][0]:.2f}x |")
    rows = [{"variant": n, "kernels": [k.query_block, k.loss_chunk, int(k.blocked_forward)] if k else None,
             "seconds": median[n][1], "median": median[n][0]} for n, k in variants.items()]
    return {"preset": args.preset, "cpu": cpu_info().model, "features": cpu_info().features,
            "tokens_per_step": tokens, "rounds": args.rounds, "variants": rows}


# ---- bf16 against fp32 over a run -----------------------------------------------------------------------
def run_metrics(data: Path, out: Path, preset: str, dtype: str, steps: int, compiled: bool) -> list[dict]:
    """One `slm train` run in a scratch ``out``; its metrics.jsonl records."""
    args = [sys.executable, "-m", "slm.cli", "train", "--data", str(data), "--out", str(out), "--preset", preset,
            "--dtype", dtype, "--max-steps", str(steps), "--eval-interval", "100", "--eval-windows", "64",
            "--log-interval", "10", "--threads", "2", "--seed", "0", "--quiet",
            "--compile" if compiled else "--no-compile"]
    subprocess.run(args, check=True, cwd=ROOT)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def summarize(records: list[dict]) -> dict:
    train = [r for r in records if r["kind"] == "train"]
    val = {r["step"]: r["val_bpb"] for r in records if r["kind"] == "eval"}
    return {"tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in train[1:])),
            "val_bpb": val, "final_train_loss": round(train[-1]["loss"], 4)}


def loss_check(args: argparse.Namespace, scratch: Path) -> dict:
    results = {}
    for dtype in ("fp32", "bf16"):
        compiled = args.compile and dtype == "bf16"
        records = run_metrics(args.data.resolve(), scratch / dtype, args.preset, dtype, args.steps, compiled)
        results[dtype] = {**summarize(records), "compiled": compiled}
        print(f"{dtype}: {results[dtype]}", flush=True)
    info = cpu_info()
    cpu = f"{info.model}, {info.threads} threads, {' '.join(info.features)}; probe: bf16 {bf16_speedup():.2f}x fp32"
    fp32, bf16 = results["fp32"], results["bf16"]
    name = "bf16 + compile" if bf16["compiled"] else "bf16"
    print(f"\n{args.preset}, {args.steps} steps, on {cpu}\n")
    print(f"| step | fp32 val bits/byte | {name} val bits/byte | {name} - fp32 |\n|---|---|---|---|")
    for step, a in fp32["val_bpb"].items():
        print(f"| {step} | {a:.4f} | {bf16['val_bpb'][step]:.4f} | {bf16['val_bpb'][step] - a:+.4f} |")
    print(f"| tokens/s (median) | {fp32['tokens_per_s']:,} | {bf16['tokens_per_s']:,} | "
          f"{bf16['tokens_per_s'] / fp32['tokens_per_s']:.2f}x |")
    return {"preset": args.preset, "steps": args.steps, "cpu": cpu, **results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a directory made by `slm prepare`")
    parser.add_argument("--preset", default="cpu-7m")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of 3 steps each (default 5; kernels 7)")
    parser.add_argument("--kernels", action="store_true", help="time training-kernel variants instead")
    parser.add_argument("--variants", default=DEFAULT_KERNELS, help="with --kernels: name:block:chunk[:forward],...")
    parser.add_argument("--fp32", action="store_true", help="with --kernels: also time fp32 eager, the baseline")
    parser.add_argument("--loss-check", action="store_true", help="bf16 against fp32 validation loss over a run")
    parser.add_argument("--steps", type=int, default=300, help="with --loss-check: steps of each run")
    parser.add_argument("--compile", action="store_true", help="with --loss-check: compile the bf16 run")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    args.rounds = args.rounds or (7 if args.kernels else 5)
    scratch = Path(tempfile.mkdtemp(prefix="slm-step-time-"))
    try:
        what = loss_check if args.loss_check else kernels if args.kernels else precisions
        out = what(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
