"""Every figure of the bundled model's card, for the bundled model and candidates to replace it.

    cd tools && python bundled_model.py --data ../runs/v4/data default ../runs/v4/run/best \
        [--json bundled-model.json]

1. The card's slice: bits/byte (`slm eval`'s sliding window) of the first CARD_BYTES bytes of the
   children-books validation documents of `--data` (or of `--card-text`; `--write-card-text` saves the slice).
2. Per input: bits/byte of each plain input's validation documents in `--data` (first --max-tokens of each;
   eval_sources.py). The data must hold out what the bundled model held out (same inputs, order, --val-fraction
   0.02, --seed 0), so no model here trained on any of it.
3. Requested words: `--requests` word triples of validation stories (tinystories-sample and fables), 200 tokens at
   temperature 0.8 (instruct_words.py). A model with the words-v1 template gets the header; one without it the
   plain-English request. Twice: the model alone (word boost 0), and with decoding steered toward the words at
   the default boost (slm.instruct.WORD_BOOST).
4. Greedy stories: each example prompt, greedy with the playground's repetition penalty and max new tokens;
   counted: sentences, and sentences that repeat an earlier one.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType

from eval_sources import source_documents
from instruct_words import inclusion, known_words, unknown_share, validation_requests, write_stories

import slm
from slm import checkpoint
from slm.evaluate import evaluate_text
from slm.generation import Engine, SamplingParams
from slm.instruct import WORD_BOOST


def load_playground() -> ModuleType:
    """The playground's script as a module (not run: it draws only as __main__), for its example prompts and
    defaults, so that the figures here are measured with what the user gets."""
    spec = importlib.util.spec_from_file_location("slm_playground", Path(slm.__file__).parent / "ui" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PLAYGROUND = load_playground()
CARD_BYTES = 471_733  # the card's slice: two books, as every card since the first has scored it
SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”’]?\s+")


def sentences(text: str) -> list[str]:
    """Sentences of at least three words (a cut-off last one counts only if it ends with . ! or ?)."""
    parts = [p.strip() for p in SENTENCE_END.split(text.strip()) if p.strip()]
    if parts and not re.search(r"[.!?][\"'”’]?$", parts[-1]):
        parts.pop()
    return [p for p in parts if len(p.split()) >= 3]


def repeated(parts: list[str]) -> int:
    seen, count = set(), 0
    for p in parts:
        key = re.sub(r"\W+", " ", p.lower()).strip()
        count += key in seen
        seen.add(key)
    return count


def greedy_stories(net, tokenizer, controls: dict | None = None) -> list[dict]:
    """Greedy answers to the playground's example prompts, at its defaults or at `controls` (penalties)."""
    prompts = PLAYGROUND.EXAMPLE_PROMPTS
    engine = Engine(net, tokenizer, max_batch=len(prompts))
    controls = controls or {"repetition_penalty": PLAYGROUND.REPETITION_DEFAULT}
    params = SamplingParams(max_new_tokens=PLAYGROUND.MAX_NEW_DEFAULT, temperature=0.0, **controls)
    seqs = [engine.add(tokenizer.encode(p), params) for p in prompts]
    while not all(s.finished for s in seqs):
        engine.step()
    rows = []
    for prompt, seq in zip(prompts, seqs, strict=True):
        parts = sentences(prompt + seq.text)
        rows.append({"prompt": prompt, "text": seq.text, "sentences": len(parts), "repeated": repeated(parts)})
    return rows


def card_slice(books: list[str]) -> str:
    """The first CARD_BYTES bytes of the children-books validation documents, as decoded from val.bin."""
    return "<|endoftext|>".join(books).encode("utf-8")[:CARD_BYTES].decode("utf-8", errors="ignore")


def measure(model: str, card_text: str, plain: dict[str, list[str]], requests: list[tuple[str, ...]],
            tokens: int, known: set[str]) -> dict:
    net, tokenizer = checkpoint.load(model)
    header = checkpoint.template(model) is not None
    card = evaluate_text(net, tokenizer, [card_text], "card")["bits_per_byte"]
    bpb = {name: evaluate_text(net, tokenizer, docs, name)["bits_per_byte"] for name, docs in plain.items()}
    alone = write_stories(model, requests, header, tokens)
    steered = write_stories(model, requests, header, tokens, word_boost=WORD_BOOST)
    return {"model": model, "prompt": "header" if header else "plain English", "card_slice": card, "bpb": bpb,
            **inclusion(alone, requests), "invented": unknown_share(alone, known),
            "steered": {"word_boost": WORD_BOOST, **inclusion(steered, requests),
                        "invented": unknown_share(steered, known)},
            "greedy": greedy_stories(net, tokenizer),
            "word_samples": [(list(w), t) for w, t in zip(requests[:3], alone[:3], strict=True)],
            "steered_samples": [(list(w), t) for w, t in zip(requests[:3], steered[:3], strict=True)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--data", required=True)
    ap.add_argument("--card-text", help="score this text as the card's slice instead of the one from --data")
    ap.add_argument("--write-card-text", help="save the card's slice to this file")
    ap.add_argument("--max-tokens", type=int, default=100_000)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--json")
    args = ap.parse_args()
    requests = validation_requests(args.data, args.requests)
    plain = {k: v for k, v in source_documents(args.data, args.max_tokens).items() if not k.startswith("instruct")}
    books = source_documents(args.data, 10**9)["children-books"]
    known = known_words(args.data)
    card = Path(args.card_text).read_text(encoding="utf-8") if args.card_text else card_slice(books)
    if args.write_card_text:
        Path(args.write_card_text).write_text(card, encoding="utf-8")
    rows = []
    for model in args.models:
        rows.append(measure(model, card, plain, requests, args.tokens, known))
        print(json.dumps({k: v for k, v in rows[-1].items() if "samples" not in k and k != "greedy"}), flush=True)
    names = list(plain)
    print(f"\n| model | card slice | {' | '.join(names)} | words used (alone / steered) | all three (alone / steered) "
          "| invented words (alone / steered) | greedy: sentences (repeated) |")
    print("|---" * (6 + len(names)) + "|")
    for r in rows:
        greedy = ", ".join(f"{g['sentences']} ({g['repeated']})" for g in r["greedy"])
        print(f"| {r['model']} | {r['card_slice']:.3f} | " + " | ".join(f"{r['bpb'][n]:.3f}" for n in names)
              + f" | {r['words_used']:.1%} / {r['steered']['words_used']:.1%} | {r['all_three']:.1%} / "
              f"{r['steered']['all_three']:.1%} | {r['invented']:.1%} / {r['steered']['invented']:.1%} | {greedy} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
