"""Validation bits/byte of checkpoints on each input of a prepared data directory, plus extra text files.

    python tools/eval_sources.py --data runs/all-data-v2 --max-tokens 100000 \
        runs/calib/d1-llama-6l256-muon/best runs/mix/simple-x3/best [--text runs/card/val-120k.txt] [--json OUT]

Each input's validation documents (its token range in val.bin, from meta.json ``sources``) are decoded back to
text and scored with `slm eval`'s sliding window, so the figures compare across tokenizers. Used to decide
whether sampling some inputs more often (``slm train --mix``) helps them without hurting the rest.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from slm.checkpoint import load
from slm.data import load_meta, open_tokens
from slm.evaluate import evaluate_text
from slm.tokenizer import Tokenizer


def source_documents(data_dir: str, max_tokens: int) -> dict[str, list[str]]:
    """Each input's validation documents as text (at most ``max_tokens`` tokens of each input)."""
    meta = load_meta(data_dir)
    if not meta.get("sources"):
        raise SystemExit(f"{data_dir}: meta.json has no per-input ranges; prepare the data again")
    tokenizer = Tokenizer.load(Path(data_dir) / "tokenizer.json")
    val = open_tokens(data_dir, "val", meta)
    texts = {}
    for src in meta["sources"]:
        start, end = src["val"]
        ids = np.asarray(val[start : min(end, start + max_tokens)]).tolist()
        docs = _split(ids, meta["eot_id"])
        texts[Path(src["input"]).name.split(".")[0]] = [tokenizer.decode(d) for d in docs if d]
    return texts


def _split(ids: list[int], eot: int) -> list[list[int]]:
    docs, current = [], []
    for i in ids:
        if i == eot:
            docs.append(current)
            current = []
        else:
            current.append(i)
    return docs + [current]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--data", required=True)
    ap.add_argument("--max-tokens", type=int, default=100_000)
    ap.add_argument("--text", action="append", default=[], help="also score this text file")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    texts = source_documents(args.data, args.max_tokens)
    for path in args.text:
        texts[Path(path).name] = [Path(path).read_text(encoding="utf-8")]
    results = {}
    for ckpt in args.checkpoints:
        model, tokenizer = load(ckpt)
        results[ckpt] = {name: evaluate_text(model, tokenizer, docs, name) for name, docs in texts.items()}
    names = list(texts)
    print("| checkpoint | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for ckpt, row in results.items():
        print(f"| {ckpt} | " + " | ".join(f"{row[n]['bits_per_byte']:.3f}" for n in names) + " |")
    print("tokens scored: " + ", ".join(f"{n} {results[args.checkpoints[0]][n]['tokens']:,}" for n in names))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
