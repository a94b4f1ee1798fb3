"""bf16 autocast vs fp32 training on this CPU: the same run twice, tokens/s and validation loss side by side.

    python benchmarks/precision.py --data runs/v4/data [--preset cpu-7m] [--steps 300] [--compile] [--json F]

Both runs train ``--preset`` from scratch with its own recipe, the same seed (so the same windows in the same
order), 4,096 tokens a step, 2 threads, and score the same 64 validation windows every 100 steps; only
``--dtype`` differs, and with ``--compile`` the bf16 run is compiled too (what a long `slm train` does unasked
where bf16 pays), against fp32 eager. `--dtype auto` picks bf16 only where a measured bf16 matrix product is at
least 1.5x fp32's (`slm info`), and it may only do so if the loss does not suffer: the table says by how much the
two runs' validation bits/byte differ at each evaluation (the goal: within 0.01 over 300 steps). Run it on an
idle machine: the tokens/s are medians of the logged steps (the first, which holds any compiling, left out).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from slm.cpu import bf16_speedup, cpu_info

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("fp32", "bf16")


def train(data: Path, out: Path, preset: str, dtype: str, steps: int, compiled: bool) -> list[dict]:
    """One run; its metrics.jsonl records. ``out`` is this script's scratch directory: an earlier run's is replaced."""
    shutil.rmtree(out, ignore_errors=True)
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


def table(results: dict) -> str:
    fp32, bf16 = results["fp32"], results["bf16"]
    name = "bf16 + compile" if bf16["compiled"] else "bf16"
    rows = [f"| step | fp32 val bits/byte | {name} val bits/byte | {name} - fp32 |", "|---|---|---|---|"]
    for step, a in fp32["val_bpb"].items():
        b = bf16["val_bpb"][step]
        rows.append(f"| {step} | {a:.4f} | {b:.4f} | {b - a:+.4f} |")
    speed = bf16["tokens_per_s"] / fp32["tokens_per_s"]
    rows.append(f"| tokens/s (median) | {fp32['tokens_per_s']:,} | {bf16['tokens_per_s']:,} | {speed:.2f}x |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a directory made by `slm prepare`")
    parser.add_argument("--preset", default="cpu-7m")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--compile", action="store_true", help="compile the bf16 run (fp32 stays eager)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "precision")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    started = time.perf_counter()
    results = {}
    for dtype in DTYPES:
        out = args.work / f"{args.preset}-{dtype}"
        compiled = args.compile and dtype == "bf16"
        results[dtype] = {**summarize(train(args.data.resolve(), out, args.preset, dtype, args.steps, compiled)),
                          "compiled": compiled}
        print(f"{dtype}: {results[dtype]}", flush=True)
    info = cpu_info()
    cpu = (f"{info.model}, {info.threads} threads, {' '.join(info.features)}; "
           f"probe: bf16 matmuls {bf16_speedup():.2f}x fp32")
    print(f"\n{args.preset}, {args.steps} steps, on {cpu}\n")
    print(table(results))
    print(f"\n({time.perf_counter() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "steps": args.steps, "cpu": cpu, **results},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
