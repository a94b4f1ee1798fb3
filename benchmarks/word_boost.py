"""How strongly should decoding steer toward the requested words? A sweep of `--word-boost` on one model.

    cd benchmarks && python word_boost.py --data ../runs/v4/data --model default [--json word-boost.json]

Requests as in instruct_words.py (word triples of validation stories of tinystories-sample and fables, the
header, 200 tokens at temperature 0.8, seed = request number), once per boost. For each boost: the share of
the words used, of the stories that use all three, and what the steering costs: the model's own loss on the
stories it wrote (nats per generated token, scored without any boost: how far the text strays from what the
model would write), the share of its words that occur nowhere in the validation text of --data (invented
words: "Lanci", "ballcle"), and the share of sentences that repeat an earlier one of the same story.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bundled_model import repeated, sentences
from instruct_words import inclusion, known_words, request_prompt, unknown_share, validation_requests, write_stories

from slm import checkpoint

BOOSTS = [0.0, 2.0, 3.0, 4.0, 6.0, 8.0]


@torch.inference_mode()
def own_loss(model: str, prompts: list[str], texts: list[str]) -> float:
    """Mean loss (nats/token) of the written tokens under the model itself, given their prompt."""
    net, tokenizer = checkpoint.load(model)
    total, count = 0.0, 0
    for prompt, text in zip(prompts, texts, strict=True):
        head, story = tokenizer.encode(prompt), tokenizer.encode(text)
        if not story:
            continue
        ids = torch.tensor([(head + story)[-net.config.context_length :]])
        logits = net(ids[:, :-1])
        losses = torch.nn.functional.cross_entropy(logits[0], ids[0, 1:], reduction="none")
        total += float(losses[-len(story) :].sum())
        count += min(len(story), losses.numel())
    return total / count


def repeated_share(texts: list[str]) -> float:
    parts = [sentences(t) for t in texts]
    return sum(map(repeated, parts)) / max(1, sum(map(len, parts)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="prepared data holding the validation stories")
    ap.add_argument("--model", default="default")
    ap.add_argument("--boosts", default=",".join(f"{b:g}" for b in BOOSTS))
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--json")
    args = ap.parse_args()
    requests = validation_requests(args.data, args.requests)
    prompts = [request_prompt(words, header=True) for words in requests]
    known = known_words(args.data)
    rows = []
    for boost in map(float, args.boosts.split(",")):
        texts = write_stories(args.model, requests, True, args.tokens, word_boost=boost)
        rows.append({"word_boost": boost, **inclusion(texts, requests),
                     "own_loss": own_loss(args.model, prompts, texts), "unknown_words": unknown_share(texts, known),
                     "repeated_sentences": repeated_share(texts),
                     "samples": [(list(w), t) for w, t in zip(requests[:3], texts[:3], strict=True)]})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "samples"}), flush=True)
    print(f"\n{args.model}: {len(requests)} requests, {args.tokens} tokens each, temperature 0.8\n")
    print("| word boost | words used | stories with all three | own loss (nats/token) | invented words "
          "| sentences repeated |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['word_boost']:g} | {r['words_used']:.1%} | {r['all_three']:.1%} | {r['own_loss']:.3f} | "
              f"{r['unknown_words']:.1%} | {r['repeated_sentences']:.1%} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "rows": rows}, indent=1) + "\n",
                                   encoding="utf-8")


if __name__ == "__main__":
    main()
