"""Table and plot for docs/training-on-cpu.md from the calibration runs (benchmarks/cpu_calibration.sh).

    python benchmarks/cpu_calibration_report.py [--runs runs/calib] [--plot docs/training-on-cpu.png] [--marks 10,20]

Training is deterministic given its settings, so the validation figures do not depend on how busy the
machine was; only the time axis does. "CPU minutes" are therefore *idle-machine* minutes: tokens seen
divided by the run's undisturbed training speed (the 80th percentile of its logged tokens/s windows,
optimizer step included, evaluation excluded). Wall minutes as measured are in the table too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def load_run(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    config = json.loads((run / "last" / "config.json").read_text())
    speed = float(np.percentile([r["tokens_per_s"] for r in train], 80)) if train else float("nan")
    return {
        "name": run.name,
        "params": config["training"]["parameters"],
        "shape": config["model"],
        "optimizer": config["training"]["train_config"]["optimizer"],
        "steps": config["training"]["steps"],
        "max_steps": config["training"]["train_config"]["max_steps"],
        "tokens_per_s": speed,
        "wall_min": evals[-1]["elapsed"] / 60,
        "curve": [(e["tokens"] / speed / 60, e["val_bpb"]) for e in evals],
        "token_curve": [(e["tokens"] / 1e6, e["val_bpb"]) for e in evals],
        "final_bpb": evals[-1]["val_bpb"],
        "tokens": evals[-1]["tokens"],
    }


def read_curve(curve: list[tuple[float, float]], x: float, slack: float = 0.0) -> float | None:
    """The curve's bits/byte at ``x`` (linear between evaluations), None if the run did not reach it."""
    xs, ys = zip(*curve, strict=True)
    return float(np.interp(x, xs, ys)) if xs[0] <= x <= xs[-1] + slack else None


def bpb_at(run: dict, minutes: float) -> float | None:
    """Validation bits/byte at ``minutes`` idle CPU minutes."""
    return read_curve(run["curve"], minutes, slack=0.25)


def bpb_after(run: dict, million_tokens: float) -> float | None:
    """Validation bits/byte after ``million_tokens``."""
    return read_curve(run["token_curve"], million_tokens)


def per_token_table(runs: list[dict], marks: list[float]) -> str:
    """Validation bits/byte after the same numbers of tokens: what each shape learns per token."""
    lines = ["| variant | params | " + " | ".join(f"after {m:g}M tokens" for m in marks) + " |",
             "|---|---|" + "---|" * len(marks)]
    for r in runs:
        at = [bpb_after(r, m) for m in marks]
        cells = " | ".join(f"{x:.3f}" if x is not None else "-" for x in at)
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.1f}M | {cells} |")
    return "\n".join(lines)


def table(runs: list[dict], marks: list[float]) -> str:
    named = " / ".join(f"{m:g}" for m in marks)
    lines = ["| variant | params | optimizer | steps | tokens | tokens/s (idle) | CPU min (idle) | wall min "
             f"| val bits/byte at {named} min | final val bits/byte |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        at = [bpb_at(r, m) for m in marks]
        read = " / ".join(f"{x:.3f}" if x is not None else "-" for x in at)
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.1f}M | {r['optimizer']} | {r['steps']} | "
                     f"{r['tokens'] / 1e6:.2f}M | {r['tokens_per_s']:,.0f} | {r['curve'][-1][0]:.1f} | "
                     f"{r['wall_min']:.1f} | {read} | **{r['final_bpb']:.3f}** |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for r in runs:
        xs, ys = zip(*r["curve"], strict=True)
        ax.plot(xs, ys, "o-", ms=3, label=f"{r['name']} ({r['params'] / 1e6:.1f}M)")
    ax.set_xlabel("CPU minutes (2 cores, idle-machine speed)")
    ax.set_ylabel("validation bits/byte")
    ax.set_ylim(top=min(3.0, ax.get_ylim()[1]))
    ax.set_title("Training on this CPU: architecture, optimizer and size at equal CPU time", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def numbers(text: str) -> list[float]:
    return [float(part) for part in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/calib")
    parser.add_argument("--plot", default="docs/training-on-cpu.png")
    parser.add_argument("--json", default="benchmarks/cpu-calibration.json")
    parser.add_argument("--marks", default="10,20", help="CPU minutes at which the table reads each curve")
    parser.add_argument("--token-marks", default="", help="millions of tokens for a per-token table, e.g. 2,4,6")
    args = parser.parse_args()
    runs = [load_run(p) for p in sorted(Path(args.runs).iterdir()) if (p / "last" / "config.json").is_file()]
    unfinished = [r["name"] for r in runs if r["steps"] < r["max_steps"]]
    runs = [r for r in runs if r["steps"] >= r["max_steps"]]
    print(table(runs, numbers(args.marks)))
    if args.token_marks:
        print("\n" + per_token_table(runs, numbers(args.token_marks)))
    if unfinished:
        print(f"\nnot finished (continue: RESUME=1 bash benchmarks/cpu_calibration.sh NAME): {', '.join(unfinished)}")
    plot(runs, Path(args.plot))
    Path(args.json).write_text(json.dumps(runs, indent=1) + "\n")


if __name__ == "__main__":
    main()
