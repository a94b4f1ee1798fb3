"""Choose the playground's repetition-control defaults by measurement.

    cd benchmarks && python penalty_sweep.py --model default --text ../runs/card/card.txt [--json OUT]

(the card's slice: `python bundled_model.py --data DIR --write-card-text ../runs/card/card.txt default`.)
For each (repetition_penalty, frequency_penalty) on a grid, three numbers:

- **repeats**: the share of repeated token 3-grams in what the model writes, greedy and at the playground's
  sampling settings (temperature 0.8), over a fixed prompt set. Loops show up here.
- **held-out cost**: how much worse the *penalised* distribution predicts real held-out text than the plain
  one, in bits per byte. The text is scored teacher-forced in windows of 16 + 128 tokens: the first 16 play
  the prompt, the other 128 (about the playground's 100-token answers) the "generated" tokens that the
  penalties count. Real text repeats words
  too ("the", names), so a penalty that is too strong makes real text less likely: this is its price.
- **greedy stories**: the playground's example prompts answered greedily at its max new tokens
  (bundled_model.py): the fewest sentences of the five, and how many sentences repeat an earlier one in all.

A good default removes most loops at a small held-out cost.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from bundled_model import greedy_stories

from slm.checkpoint import load
from slm.generation import SamplingParams, apply_penalties, generate

PROMPTS = ["Once upon a time", "The little rabbit", "A little girl went to the woods", "The king had three sons",
           "One day, a fox", "In the forest there was", "The old man said", "It was a cold winter night"]
REPETITION = [1.0, 1.1, 1.2, 1.3, 1.5]
FREQUENCY = [0.0, 0.2, 0.5]
PROMPT_TOKENS = 16  # of each held-out window: counted by the repetition penalty only, like a prompt


def repeated_share(tokens: list[int]) -> float:
    grams = [tuple(tokens[i : i + 3]) for i in range(len(tokens) - 2)]
    return (len(grams) - len(set(grams))) / max(1, len(grams))


def repeats(model, tokenizer, controls: dict, temperature: float, new_tokens: int, seeds: int) -> float:
    ids = [tokenizer.encode(p) for p in PROMPTS]
    shares = []
    for seed in range(seeds if temperature else 1):
        outs = generate(model, ids, max_new_tokens=new_tokens, temperature=temperature, seed=seed * 100,
                        eot_id=tokenizer.eot_id, **controls)
        shares += [repeated_share(o[len(p) :]) for o, p in zip(outs, ids, strict=True)]
    return sum(shares) / len(shares)


@torch.inference_mode()
def window_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids[:-1]]))[0].float()


def penalised_nll(logits: torch.Tensor, ids: list[int], controls: dict, vocab: int) -> float:
    """Summed NLL (nats) of ids[PROMPT_TOKENS + 1:] under the penalised distribution, teacher-forced."""
    targets = torch.tensor(ids[1:])
    onehot = torch.nn.functional.one_hot(torch.tensor(ids[:-1]), vocab).float()
    seen = onehot.cumsum(0) > 0  # row t: tokens among ids[0..t]
    generated = onehot.clone()
    generated[:PROMPT_TOKENS] = 0
    counts = generated.cumsum(0)  # row t: counts of ids[PROMPT_TOKENS..t]
    params = [SamplingParams(max_new_tokens=1, **controls)] * len(targets)
    logprobs = torch.log_softmax(apply_penalties(logits, counts, seen, params), dim=-1)
    picked = logprobs.gather(1, targets[:, None])[:, 0]
    return -float(picked[PROMPT_TOKENS:].sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--text", required=True, help="held-out text (e.g. the model card's validation slice)")
    ap.add_argument("--windows", type=int, default=100)
    ap.add_argument("--window-tokens", type=int, default=PROMPT_TOKENS + 128)
    ap.add_argument("--new-tokens", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load(args.model)
    context, vocab = min(args.window_tokens, model.config.context_length), model.config.vocab_size

    ids = tokenizer.encode(Path(args.text).read_text(encoding="utf-8"))
    stride = max(context, (len(ids) - context) // args.windows)
    windows = [ids[i : i + context + 1] for i in range(0, len(ids) - context, stride)][: args.windows]
    logits = [window_logits(model, w) for w in windows]
    n_bytes = sum(len(tokenizer.decode(w[PROMPT_TOKENS + 1 :]).encode("utf-8")) for w in windows)

    rows = []
    for rep in REPETITION:
        for freq in FREQUENCY:
            controls = {"repetition_penalty": rep, "frequency_penalty": freq}
            nll = sum(penalised_nll(lg, w, controls, vocab) for lg, w in zip(logits, windows, strict=True))
            stories = greedy_stories(model, tokenizer, controls)
            rows.append({**controls, "heldout_bpb": nll / math.log(2) / n_bytes,
                         "greedy_repeats": repeats(model, tokenizer, controls, 0.0, args.new_tokens, 1),
                         "sampled_repeats": repeats(model, tokenizer, controls, 0.8, args.new_tokens, args.seeds),
                         "story_sentences": [s["sentences"] for s in stories],
                         "story_repeated": sum(s["repeated"] for s in stories)})
            print(rows[-1], flush=True)
    base = rows[0]["heldout_bpb"]
    print(f"\n{args.model}: {len(PROMPTS)} prompts x {args.new_tokens} tokens (sampled: temperature 0.8, "
          f"{args.seeds} seeds); held-out: {len(windows)} windows of {context}, {n_bytes:,} bytes\n")
    print("| repetition_penalty | frequency_penalty | repeated 3-grams, greedy | repeated 3-grams, T=0.8 | "
          "held-out bits/byte | cost | example stories: sentences (fewest) | repeated sentences |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['repetition_penalty']} | {r['frequency_penalty']} | {r['greedy_repeats']:.1%} | "
              f"{r['sampled_repeats']:.1%} | {r['heldout_bpb']:.4f} | {r['heldout_bpb'] - base:+.4f} | "
              f"{min(r['story_sentences'])} | {r['story_repeated']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
