"""Does a model read the request header? The loss on requested words with and without it.

    cd benchmarks && python header_gain.py --data ../runs/v3/data default ../runs/v3/run/best

For the instruct copies' validation stories in ``--data`` (their first --stories of each input), the loss (nats)
on the first token of each requested word's first use in the story, with the story's header in front and
without it; and the mean loss on every story token both ways. A model that copies words from the header gains
several nats on those tokens; one that only takes the header as a topic hint gains a fraction of one.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from eval_sources import source_documents

from slm import checkpoint

STORY = "Story:\n"


def instruct_stories(data: str, per_input: int) -> list[tuple[str, str]]:
    """(header, story) pairs of the instruct copies' validation documents."""
    pairs = []
    for name, docs in source_documents(data, 400_000).items():
        if name.startswith("instruct:"):
            pairs += [(d.split(STORY, 1)[0] + STORY, d.split(STORY, 1)[1]) for d in docs[:per_input] if STORY in d]
    return pairs


def word_positions(tokenizer, story: str, words: list[str]) -> list[int]:
    """Token index (in the story's tokens) of each requested word's first use, where the story uses it."""
    out = []
    for word in words:
        k = story.find(" " + word)
        if k >= 0:
            out.append(len(tokenizer.encode(story[:k])))
    return out


def losses(model, tokenizer, head: str, story: str, context: int) -> tuple[torch.Tensor, int]:
    """Per-token loss of the story after <|endoftext|> + head, and the index where the story starts."""
    prefix = [tokenizer.eot_id] + tokenizer.encode(head)
    ids = (prefix + tokenizer.encode(story))[:context]
    logits = model(torch.tensor([ids]))[0].float()
    nll = F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
    return nll[len(prefix) - 1 :], len(ids) - len(prefix)


def measure(model_name: str, pairs: list[tuple[str, str]]) -> dict:
    model, tokenizer = checkpoint.load(model_name)
    row: dict = {"model": model_name}
    for with_header in (True, False):
        story_nll, word_nll = [], []
        for head, story in pairs:
            words = [w.strip() for w in head.split("\n")[0].removeprefix("Words:").split(",")]
            nll, n = losses(model, tokenizer, head if with_header else "", story, model.config.context_length)
            story_nll.append(nll)
            word_nll += [nll[p].item() for p in word_positions(tokenizer, story, words) if p < n]
        key = "with header" if with_header else "without"
        row[key] = {"story_nats": torch.cat(story_nll).mean().item(), "word_nats": sum(word_nll) / len(word_nll),
                    "words": len(word_nll)}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="prepared data with instruct copies (slm prepare --instruct)")
    ap.add_argument("--stories", type=int, default=80, help="validation stories of each instruct input")
    ap.add_argument("models", nargs="+")
    args = ap.parse_args()
    pairs = instruct_stories(args.data, args.stories)
    print(f"{len(pairs)} validation stories\n\n| model | requested words: with header | without | gain | "
          "story tokens: with header | without |\n|---|---|---|---|---|---|")
    with torch.inference_mode():
        for name in args.models:
            r = measure(name, pairs)
            w, wo = r["with header"], r["without"]
            print(f"| {name} | {w['word_nats']:.2f} | {wo['word_nats']:.2f} | {wo['word_nats'] - w['word_nats']:.2f} "
                  f"| {w['story_nats']:.3f} | {wo['story_nats']:.3f} |")
            print(json.dumps(r))


if __name__ == "__main__":
    main()
