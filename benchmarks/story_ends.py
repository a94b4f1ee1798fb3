"""How soon a model ends its stories: the playground's example prompts, sampled at its defaults.

    cd benchmarks && python story_ends.py default ../runs/v12/run/last [--seeds 10] [--tokens 200] [--json FILE]

For each model, each example prompt is answered with `--seeds` seeds at the playground's temperature and
repetition penalty, `--tokens` new tokens at most. Counted per prompt: the share of answers that end their story
(`<|endoftext|>`) before five sentences, and the median sentences written. The greedy answers of
bundled_model.py are one sample of this; here the early ends are counted over many. Written to compare data
whose cut-off instruct parts teach an end (`slm prepare` before 2026-12-07) with data that masks it.
"""

from __future__ import annotations

import argparse
import json
import statistics

from bundled_model import PLAYGROUND, sentences

from slm import checkpoint
from slm.generation import Engine, SamplingParams

EARLY = 5  # the card's goal: at least five sentences


def answers(model: str, seeds: int, tokens: int) -> dict[str, list[tuple[int, bool]]]:
    """(sentences, ended with <|endoftext|>) of every answer, by prompt."""
    net, tokenizer = checkpoint.load(model)
    prompts = PLAYGROUND.EXAMPLE_PROMPTS
    engine = Engine(net, tokenizer, max_batch=len(prompts) * seeds)
    seqs = {p: [engine.add(tokenizer.encode(p), SamplingParams(
        max_new_tokens=tokens, temperature=PLAYGROUND.TEMPERATURE_DEFAULT, seed=seed,
        repetition_penalty=PLAYGROUND.REPETITION_DEFAULT)) for seed in range(seeds)] for p in prompts}
    while engine.active:
        engine.step()
    return {p: [(len(sentences(p + s.text)), s.finish_reason == "eot") for s in group] for p, group in seqs.items()}


def summary(rows: dict[str, list[tuple[int, bool]]]) -> dict[str, dict]:
    return {p: {"early_end": sum(ended and n < EARLY for n, ended in r) / len(r),
                "ended": sum(ended for _, ended in r) / len(r),
                "median_sentences": statistics.median(n for n, _ in r)} for p, r in rows.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--json")
    args = ap.parse_args()
    results = {m: summary(answers(m, args.seeds, args.tokens)) for m in args.models}
    print(f"{args.seeds} answers a prompt, up to {args.tokens} tokens, temperature "
          f"{PLAYGROUND.TEMPERATURE_DEFAULT}, repetition penalty {PLAYGROUND.REPETITION_DEFAULT}: ended before "
          f"{EARLY} sentences / ended at all / median sentences\n")
    print("| prompt | " + " | ".join(args.models) + " |\n|---|" + "---|" * len(args.models))
    for p in PLAYGROUND.EXAMPLE_PROMPTS:
        cells = [f"{r[p]['early_end']:.0%} / {r[p]['ended']:.0%} / {r[p]['median_sentences']:g}"
                 for r in results.values()]
        print(f"| {p} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seeds": args.seeds, "tokens": args.tokens, "models": results}, f, indent=1)


if __name__ == "__main__":
    main()
