"""Bundle a trained checkpoint as models/NAME: fp16 weights, tokenizer, config (the run's training summary
kept), the metrics of every leg that made it, counted on from the earlier legs, and their loss plot.

    python tools/bundle_model.py runs/v2/run/best --run runs/v2/run --name slm-7m-stories \
        --earlier models/slm-7m-stories/metrics.jsonl --note "..." --force

``--earlier``: the metrics of the model the run started from (--init-from), up to the step it was taken at;
the run's own points follow with steps, tokens and elapsed seconds added to that model's. Every point carries
its ``leg`` (1 = earliest): a run's legs begin at its "leg" records (`slm train` writes one at each start and
each --resume, with the machine and precision). The card (README.md) is written by hand; an existing one is kept.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from slm import checkpoint
from slm.outputs import new_directory

ROOT = Path(__file__).resolve().parents[1]


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def numbered_legs(records: list[dict], first: int = 1) -> list[dict]:
    """Each record with its leg: a new one at every "leg" record (a run from before those records has its first
    leg unmarked, so its first point starts leg ``first``)."""
    leg, numbered = first - 1, []
    for m in records:
        if m["kind"] == "leg" or leg < first:
            leg += 1
        numbered.append({**m, "leg": leg})
    return numbered


def joined_metrics(earlier: list[dict], run: list[dict], start: dict) -> list[dict]:
    """Earlier legs up to the starting step, then this run's points counted on from the starting model.

    ``start`` counts in the starting model's own leg (its run's steps and tokens), the last one in
    ``earlier``; that leg began where the legs before it end (a bundled file keeps only their points up to
    the checkpoint the next leg started from)."""
    earlier = [{**m, "leg": m.get("leg", 1)} for m in earlier]
    legs = max((m["leg"] for m in earlier), default=0)
    previous = [m for m in earlier if m["leg"] < legs]
    steps = max((m["step"] for m in previous), default=0) + start["steps"]
    tokens = max((m["tokens"] for m in previous), default=0) + start["tokens_seen"]
    before = [m for m in earlier if m["leg"] < legs or m["step"] <= steps]
    elapsed = max((m["elapsed"] for m in before), default=0.0)
    after = [{**m, "step": m["step"] + steps, "tokens": m["tokens"] + tokens,
              "elapsed": round(m["elapsed"] + elapsed, 1)} for m in numbered_legs(run, first=legs + 1)]
    return before + after


def up_to(metrics: list[dict], step: int) -> list[dict]:
    """The points that made the checkpoint taken at ``step`` (a run's best/ may be older than its last point)."""
    return [m for m in metrics if m["step"] < step or (m["step"] == step and m["kind"] != "leg")]


def plot(metrics: list[dict], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.4), dpi=110)
    for leg in sorted({m["leg"] for m in metrics}):
        train = [m for m in metrics if m["leg"] == leg and m["kind"] == "train"]
        val = [m for m in metrics if m["leg"] == leg and m["kind"] == "eval"]
        ax.plot([m["tokens"] / 1e6 for m in train], [m["loss"] for m in train], lw=0.8, alpha=0.7,
                label=f"train, leg {leg}")
        ax.plot([m["tokens"] / 1e6 for m in val], [m["val_loss"] for m in val], "o-", ms=2.5,
                label=f"validation windows of leg {leg}")
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="the checkpoint directory to bundle (e.g. a run's best/)")
    ap.add_argument("--run", required=True, help="its run directory (metrics.jsonl)")
    ap.add_argument("--name", required=True, help="the directory name under models/")
    ap.add_argument("--earlier", help="metrics.jsonl of the model the run started from")
    ap.add_argument("--note", default="", help="a line for config.json's training.note")
    ap.add_argument("--force", action="store_true", help="replace models/NAME when it exists (its card is kept)")
    args = ap.parse_args()
    model, tokenizer = checkpoint.load(args.checkpoint)
    config = checkpoint.read_config(Path(args.checkpoint))
    training = {**config["training"], "note": args.note} if args.note else dict(config["training"])
    start = training.get("init_from")
    if start and Path(start["model"]).is_relative_to(ROOT):  # no machine's own paths in the repository
        training["init_from"] = {**start, "model": str(Path(start["model"]).relative_to(ROOT))}
    run = read_metrics(Path(args.run) / "metrics.jsonl")
    if args.earlier:
        start = training.get("init_from") or {}
        if not start:
            raise SystemExit(f"{args.checkpoint}: --earlier needs a run started with --init-from")
        metrics = joined_metrics(read_metrics(Path(args.earlier)), run, start)
    else:
        metrics = up_to(numbered_legs(run), training["steps"])
    out = ROOT / "models" / args.name
    with new_directory(out, [args.checkpoint, args.run], force=args.force) as tmp:  # replaced whole, or not at all
        checkpoint.save(model, tokenizer, tmp, training=training, dtype=torch.float16,
                        template=config.get("template"))
        (tmp / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics), encoding="utf-8")
        plot(metrics, tmp / "loss.png", f"{args.name}: {model.num_parameters() / 1e6:.1f}M parameters")
        if (out / "README.md").is_file():
            shutil.copy(out / "README.md", tmp / "README.md")
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"{out}: {size / 1e6:.1f} MB, {len(metrics)} metric points, template {config.get('template')!r}")


if __name__ == "__main__":
    main()
