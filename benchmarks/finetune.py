"""Fine-tuning the bundled model vs training the same shape from scratch, on a text neither has seen.

    python benchmarks/finetune.py --minutes 5 --steps 100 [--sweep] [--json benchmarks/finetune.json]

The new text is a whole book the bundled model never trained on: the largest juvenile-books document that a
1% document split of all of ../shared/data (seed 0) holds out. The bundled model's split held out 2% (seed 0),
and a document held out at 1% is held out at 2% too (the same hash, a lower threshold). It is
prepared with the bundled model's tokenizer; its last 10% is the validation text. Every run gets the same
optimizer steps and the same wall-time cap on this machine's cores (2 threads), one after another, and is
scored with `slm eval` on the validation text (its last/ checkpoint: best/ would be picked on that same text).
--sweep adds fine-tuning recipes beside the default one, to choose slm.train_config.FINETUNE_RECIPE.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from slm.checkpoint import load
from slm.corpus import read_documents
from slm.evaluate import evaluate_files
from slm.prepare import is_validation, tail_cut

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
INPUTS = ["children-books", "juvenile-books", "fables", "tinystories-sample", "simple-stories"]  # bundled order
VAL_FRACTION = 0.1
RUNS = {  # name -> slm train flags
    "from scratch (cpu-7m recipe)": ["--preset", "cpu-7m"],
    "fine-tuned (--init-from default)": ["--init-from", "default"],
}
SWEEP = {
    "fine-tuned, scratch recipe (muon 0.02, lr 1.5e-3, warmup 40)":
        ["--init-from", "default", "--muon-lr", "0.02", "--lr", "1.5e-3", "--warmup-steps", "40"],
}


def held_out_book(input_name: str = "juvenile-books") -> str:
    """The largest document of ``input_name`` in the bundled model's validation split."""
    index, best = 0, ""
    for name in INPUTS:
        for text in read_documents(DATA / f"{name}.jsonl.gz"):
            if not text.strip():
                continue
            if name == input_name and is_validation(index, 0, 0.01) and len(text) > len(best):
                best = text
            index += 1
    return best


def write_texts(work: Path) -> tuple[Path, Path]:
    book = held_out_book()
    work.mkdir(parents=True, exist_ok=True)
    whole, val = work / "new-text.txt", work / "new-text-val.txt"
    whole.write_text(book, encoding="utf-8")
    val.write_text(book[tail_cut(book, VAL_FRACTION):], encoding="utf-8")  # what `slm prepare` holds out
    return whole, val


def slm(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "slm.cli", *args], check=True)


def train_run(work: Path, name: str, flags: list[str], minutes: float, steps: int) -> dict:
    out = work / ("run-" + "".join(c if c.isalnum() else "-" for c in name)[:60])
    slm("train", "--data", str(work / "data"), "--out", str(out), "--max-minutes", str(minutes), "--max-steps",
        str(steps), "--eval-interval", "20", "--eval-windows", "16", "--threads", "2", "--quiet", *flags)
    return {"name": name, "flags": " ".join(flags), "out": str(out),
            **{k: v for k, v in json.loads((out / "summary.json").read_text()).items()
               if k in ("steps", "tokens_seen", "wall_time_s")}}


def val_bpb(model: str, val: Path) -> float:
    net, tokenizer = load(model)
    return evaluate_files(net, tokenizer, [val])["total"]["bits_per_byte"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/finetune")
    ap.add_argument("--minutes", type=float, default=5.0, help="wall-time cap of every run")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps of every run (its whole schedule)")
    ap.add_argument("--sweep", action="store_true", help="also run the fine-tuning recipes in SWEEP")
    ap.add_argument("--json")
    args = ap.parse_args()
    work = Path(args.work)
    whole, val = write_texts(work)
    if not (work / "data" / "meta.json").is_file():
        slm("prepare", str(whole), "--out", str(work / "data"), "--tokenizer", "default", "--val-fraction",
            str(VAL_FRACTION), "--quiet")
    rows = [{"name": "bundled model, before fine-tuning", "steps": 0, "bpb": val_bpb("default", val)}]
    runs = {**RUNS, **(SWEEP if args.sweep else {})}
    for name, flags in runs.items():
        row = train_run(work, name, flags, args.minutes, args.steps)
        row["bpb"] = val_bpb(str(Path(row["out"]) / "last"), val)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nnew text: {whole.stat().st_size:,} bytes, validation {val.stat().st_size:,} bytes\n")
    print("| run | steps | tokens | wall s | validation bits/byte |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['steps']} | {r.get('tokens_seen', 0):,} | {r.get('wall_time_s', 0)} | "
              f"{r['bpb']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"minutes": args.minutes, "steps": args.steps, "rows": rows},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
