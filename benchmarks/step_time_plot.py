"""Training tokens/s on each kind of CPU, from `benchmarks/step_time.py --json` files: one picture.

    python benchmarks/step_time_plot.py benchmarks/step-time-zen4-forward.json ... --out docs/step-time.png

One group of bars per file (CPU kind x preset): fp32 and bf16, eager and compiled, each bar labelled with its
ratio to fp32 eager. The kind is named by the file's CPU features (AMX, AVX512-BF16 or AVX2).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

VARIANTS = (("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True))
LABELS = ("fp32 eager", "fp32 compiled", "bf16 eager", "bf16 compiled (the default of a long run)")
COLORS = ("#9aa5b1", "#5f6b7a", "#f0a35e", "#d9541e")


def cpu_kind(features: list[str]) -> str:
    return "AMX" if "amx_bf16" in features else "AVX512-BF16" if "avx512_bf16" in features else "AVX2"


def tokens_per_s(result: dict) -> list[float]:
    steps = {(v["dtype"], v["compile"]): v["step_s"] for v in result["variants"]}
    return [result["tokens_per_step"] / steps[v] for v in VARIANTS]


def plot(results: list[dict], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(VARIANTS)
    for i, (label, color) in enumerate(zip(LABELS, COLORS, strict=True)):
        xs = [g + (i - 1.5) * width for g in range(len(results))]
        rates = [tokens_per_s(r)[i] for r in results]
        bars = ax.bar(xs, rates, width, label=label, color=color)
        for bar, r in zip(bars, results, strict=True):
            ratio = tokens_per_s(r)[i] / tokens_per_s(r)[0]
            ax.annotate(f"{ratio:.2f}x", (bar.get_x() + width / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=7)
    ax.set_xticks(range(len(results)), [f"{r['preset']}\n{r['cpu']}, {cpu_kind(r['features'])}" for r in results],
                  fontsize=8)
    ax.set_ylabel("training tokens/s (2 threads)")
    ax.set_title("Training speed by CPU kind: ratios to fp32 eager on the same machine", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="step_time.py --json files")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args()
    plot([json.loads(p.read_text()) for p in args.results], args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
