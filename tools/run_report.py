"""The legs table and hour log of a model card, in Markdown, from a run's or a bundled model's metrics.jsonl.

    python tools/run_report.py models/slm-16m-storyteller/metrics.jsonl

Legs begin at the "leg" records that `slm train` writes at each start and --resume (bundle_model.py numbers
them); each row gives the machine and precision of its record, steps, tokens, training time, tokens/s
(median and range of the logged points) and every validation point. The hour log cuts the run's training time
(`elapsed`, counted across legs) into hours.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundle_model import numbered_legs, read_metrics  # noqa: E402


def duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


def leg_row(records: list[dict]) -> dict:
    """One leg: where it began (its "leg" record, or the run's start), where its last point is, its speed."""
    start = next((m for m in records if m["kind"] == "leg"), {"step": 0, "tokens": 0, "elapsed": 0.0})
    points = [m for m in records if m["kind"] != "leg"]
    end = points[-1]
    speeds = [m["tokens_per_s"] for m in points if m["kind"] == "train"]
    return {"leg": records[0]["leg"], "hardware": start.get("hardware", "?"), "precision": start.get("precision", "?"),
            "compiled": start.get("compiled"), "started": start.get("started", "?"),
            "steps": (start["step"], end["step"]), "tokens": end["tokens"] - start["tokens"],
            "seconds": end["elapsed"] - start["elapsed"], "median": statistics.median(speeds),
            "slowest": min(speeds), "fastest": max(speeds),
            "evals": [(m["step"], m["val_bpb"]) for m in points if m["kind"] == "eval"]}


def legs_table(metrics: list[dict]) -> str:
    rows = [leg_row([m for m in metrics if m["leg"] == leg]) for leg in sorted({m["leg"] for m in metrics})]
    lines = ["| leg | started (UTC) | machine, precision | steps | tokens | training time | tokens/s: median (range) "
             "| validation bits/byte (step) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        compiled = ", compiled" if r["compiled"] else ""
        evals = ", ".join(f"{bpb:.3f} ({step:,})" for step, bpb in r["evals"])
        lines.append(f"| {r['leg']} | {r['started']} | {r['hardware']}; {r['precision']}{compiled} "
                     f"| {r['steps'][0]:,}-{r['steps'][1]:,} | {r['tokens']:,} "
                     f"| {duration(r['seconds'])} ({r['seconds']:,.0f} s) "
                     f"| {r['median']:,.0f} ({r['slowest']:,.0f}-{r['fastest']:,.0f}) | {evals} |")
    points = [m for m in metrics if m["kind"] != "leg"]
    last = points[-1]
    lines.append(f"\nTogether: {last['step']:,} optimizer steps, {last['tokens']:,} tokens, "
                 f"{duration(last['elapsed'])} ({last['elapsed']:,.0f} s), "
                 f"{last['tokens'] / last['elapsed']:,.0f} tokens/s overall.")
    return "\n".join(lines)


def hour_log(metrics: list[dict]) -> str:
    points = [m for m in metrics if m["kind"] != "leg"]
    lines = ["| hour of training | step at its end | tokens seen | mean tokens/s | validation bits/byte "
             "(last evaluation in the hour) |", "|---|---|---|---|---|"]
    before, hour = {"tokens": 0, "elapsed": 0.0}, 0
    while before["elapsed"] < points[-1]["elapsed"]:
        inside = [m for m in points if hour * 3600 < m["elapsed"] <= (hour + 1) * 3600]
        if inside:
            end = inside[-1]
            evals = [m for m in inside if m["kind"] == "eval"]
            val = f"{evals[-1]['val_bpb']:.3f} (step {evals[-1]['step']:,})" if evals else "-"
            speed = (end["tokens"] - before["tokens"]) / (end["elapsed"] - before["elapsed"])
            upto = hour + 1 if end["elapsed"] >= (hour + 1) * 3600 - 60 else round(end["elapsed"] / 3600, 2)
            lines.append(f"| {hour}-{upto} | {end['step']:,} | {end['tokens']:,} | {speed:,.0f} | {val} |")
            before = end
        hour += 1
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("metrics", help="a metrics.jsonl (a run's, or a bundled model's)")
    args = ap.parse_args()
    metrics = read_metrics(Path(args.metrics))
    if not all("leg" in m for m in metrics):
        metrics = numbered_legs(metrics)
    print(legs_table(metrics), "", hour_log(metrics), sep="\n")


if __name__ == "__main__":
    main()
