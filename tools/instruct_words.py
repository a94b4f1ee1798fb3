"""Does a model use the words it is asked for? The bundled model fine-tuned with and without instruct data.

    python tools/instruct_words.py --minutes 6 --steps 120 [--json benchmarks/instruct-words.json]

1. Data: all of ../shared/data in the bundled model's order with its tokenizer, split by documents (seed 0,
   1%: every document held out here was held out from the bundled model too, whose split took 2%), plus
   instruct copies of the short-story inputs (`slm prepare --instruct tinystories,fables`),
   each copy on the same side of the split as its original.
2. Three fine-tunes of the bundled model (`--init-from default`), the same steps and wall-time cap each, the
   bundled model's input weights (simple-register inputs x3): plain text only (instruct copies at weight 0);
   with the instruct copies at weight INSTRUCT_WEIGHT, loss on every token; the same with `--loss-on story`.
3. Requests: triples of content words of validation stories (tinystories-sample and fables documents that
   neither the bundled model nor the fine-tunes trained on), drawn as `slm prepare` draws them. Each model
   writes 200 tokens at temperature 0.8 (seed = request number); a word counts when it or a simple inflection
   is in the generated text (slm.instruct.used_words). Instruct models get the header; the others (the bundled
   model, the plain fine-tune) the plain-English request "This is a story about A, B and C. Once upon a time".
4. Cost: bits/byte on each plain input's validation documents (first --eval-tokens tokens of each).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

from eval_sources import source_documents

from slm import checkpoint, instruct
from slm.evaluate import evaluate_text
from slm.generation import Engine, SamplingParams

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
INPUTS = ["children-books", "juvenile-books", "fables", "tinystories-sample", "simple-stories"]  # bundled order
BUNDLED_MIX = "simple-stories=3,tinystories=3,fables=3"
INSTRUCT_WEIGHT = 30  # instruct copies are ~0.7M of ~51M weighted tokens: at 30, about 29% of the windows
RUNS = {  # name -> (slm train flags, the prompt its stories are asked for with)
    "plain text only": ([f"--mix={BUNDLED_MIX},instruct=0"], "plain English"),
    "with instruct copies, loss on all tokens": ([f"--mix={BUNDLED_MIX},instruct={INSTRUCT_WEIGHT}"], "header"),
    "with instruct copies, loss on the story only": ([f"--mix={BUNDLED_MIX},instruct={INSTRUCT_WEIGHT}",
                                                     "--loss-on", "story"], "header"),
}
PLAIN_PROMPT = "This is a story about {}, {} and {}. Once upon a time"


def slm(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "slm.cli", *args], check=True)


def requests_from(stories: list[str], n: int) -> list[tuple[str, ...]]:
    """``n`` word triples, several per story (one per seed) until there are enough."""
    out: list[tuple[str, ...]] = []
    for seed in range(10):
        for story in stories:
            words = instruct.training_request(story, seed).words
            if len(words) == 3 and words not in out:
                out.append(words)
            if len(out) == n:
                return out
    return out


def validation_requests(data_dir: str, n: int) -> list[tuple[str, ...]]:
    """``n`` word triples of the validation stories (tinystories-sample and fables) of a prepared data dir."""
    docs = source_documents(data_dir, 10**9)
    return requests_from(docs["tinystories-sample"] + docs["fables"], n)


def request_prompt(words: tuple[str, ...], header: bool) -> str:
    return instruct.header(instruct.make_request(words)) if header else PLAIN_PROMPT.format(*words)


def write_stories(model: str, requests: list[tuple[str, ...]], header: bool, tokens: int,
                  word_boost: float = 0.0) -> list[str]:
    """One story per request; ``word_boost`` > 0 steers decoding toward the words (slm.instruct.WordGuide),
    0 measures the model alone."""
    net, tokenizer = checkpoint.load(model)
    engine = Engine(net, tokenizer, max_batch=16)
    texts = []
    for start in range(0, len(requests), 16):
        seqs = []
        for i, words in enumerate(requests[start : start + 16], start):
            params = SamplingParams(max_new_tokens=tokens, temperature=0.8, seed=i, words=words, word_boost=word_boost)
            seqs.append(engine.add(tokenizer.encode(request_prompt(words, header)), params))
        while not all(s.finished for s in seqs):
            engine.step()
        texts += [s.text for s in seqs]
    return texts


WORD = re.compile(r"[A-Za-z]+")


def known_words(data: str) -> set[str]:
    """Every word (lower-cased) of the validation documents of ``data``."""
    return {w.lower() for docs in source_documents(data, 10**9).values() for d in docs for w in WORD.findall(d)}


def unknown_share(texts: list[str], known: set[str]) -> float:
    """The share of the words written that are not ``known``: invented ones ("Lanci", "ballcle"), and a few rare
    real ones the validation text happens not to hold."""
    words = [w.lower() for t in texts for w in WORD.findall(t)]
    return sum(w not in known for w in words) / max(1, len(words))


def inclusion(texts: list[str], requests: list[tuple[str, ...]]) -> dict:
    used = [instruct.used_words(t, w) for t, w in zip(texts, requests, strict=True)]
    return {"words_used": sum(map(sum, used)) / sum(map(len, used)), "all_three": sum(map(all, used)) / len(used)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/instruct")
    ap.add_argument("--minutes", type=float, default=6.0)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--eval-tokens", type=int, default=30_000)
    ap.add_argument("--json")
    args = ap.parse_args()
    work = Path(args.work)
    data = work / "data"
    if not (data / "meta.json").is_file():
        slm("prepare", *(str(DATA / f"{name}.jsonl.gz") for name in INPUTS), "--out", str(data), "--tokenizer",
            "default", "--instruct", "tinystories,fables", "--quiet")
    models = {"bundled model": ("default", "plain English")}
    for name, (flags, prompt) in RUNS.items():
        out = work / ("run-" + "".join(c if c.isalnum() else "-" for c in name)[:50])
        if not (out / "last").is_dir():
            slm("train", "--data", str(data), "--out", str(out), "--init-from", "default", "--max-minutes",
                str(args.minutes), "--max-steps", str(args.steps), "--eval-interval", "1000", "--eval-windows", "16",
                "--threads", "2", "--quiet", *flags)
        models[name] = (str(out / "last"), prompt)
    docs = source_documents(str(data), 10**9)
    requests = requests_from(docs["tinystories-sample"] + docs["fables"], args.requests)
    plain = {k: v[:400] for k, v in source_documents(str(data), args.eval_tokens).items()
             if not k.startswith("instruct")}
    rows = []
    for name, (model, prompt) in models.items():
        texts = write_stories(model, requests, prompt == "header", args.tokens)
        net, tokenizer = checkpoint.load(model)
        bpb = {k: evaluate_text(net, tokenizer, v, k)["bits_per_byte"] for k, v in plain.items()}
        row = {"model": name, "path": model, "prompt": prompt,
               **inclusion(texts, requests), "bpb": bpb, "samples": [(list(w), t) for w, t in
                                                                  zip(requests[:3], texts[:3], strict=True)]}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "samples"}), flush=True)
    names = list(plain)
    print(f"\n{len(requests)} requests, {args.tokens} tokens each, temperature 0.8\n")
    print("| model | prompt | words used | stories with all three | " + " | ".join(names) + " |")
    print("|---" * (4 + len(names)) + "|")
    for r in rows:
        print(f"| {r['model']} | {r['prompt']} | {r['words_used']:.1%} | {r['all_three']:.1%} | "
              + " | ".join(f"{r['bpb'][n]:.3f}" for n in names) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"minutes": args.minutes, "steps": args.steps, "rows": rows},
                                              indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
