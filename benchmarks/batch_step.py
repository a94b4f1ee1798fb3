"""How the native decode step and the PyTorch step scale with the batch: milliseconds per step and tokens/s for
each batch size, the way the serving engine decodes (one Engine, every row one new token a step).

    python benchmarks/batch_step.py [--model default] [--batches 1,2,4,8,16,32,64] [--march haswell]
        [--weights fp16] [--json FILE]

Each row of a batch starts from its own prompt (the playground's five example prompts, in turn); after the
prefill, --steps greedy steps are timed, native and PyTorch interleaved --repeats times (median), and both must
give the same tokens. --march builds the native step for another CPU than this one (say haswell: AVX2 without
AVX-512, to measure that build's code path on an AVX-512 machine). --weights fp16: the native step reads fp16
copies of the matrices (the PyTorch step, the baseline, stays fp32; the tokens may then differ).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import slm.native
from slm.checkpoint import load
from slm.generation import Engine, SamplingParams

PROMPTS = ("Once upon a time", "The little rabbit", "A little girl went to the woods", "The king had three sons",
           "One day, a fox")


def timed_steps(model, prompts: list[list[int]], steps: int, decode_step: str, weights: str = "fp32"
                ) -> tuple[float, list[list[int]]]:
    """Milliseconds per decode step for this batch, and every row's tokens."""
    engine = Engine(model, None, max_batch=len(prompts), decode_step=decode_step, decode_weights=weights)
    seqs = [engine.add(p, SamplingParams(max_new_tokens=steps + 1, temperature=0, stop_at_eot=False))
            for p in prompts]
    run = engine.run(seqs)
    next(run)  # the prefill and first tokens: not part of the figure
    start = time.perf_counter()
    for _ in run:
        pass
    return (time.perf_counter() - start) / steps * 1000, [s.generated for s in seqs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--batches", default="1,2,4,8,16,32,64")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--march", default="native", help="the C compiler's -march for the native step")
    parser.add_argument("--weights", default="fp32", choices=["fp32", "fp16"], help="the native step's matrices")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    slm.native.FLAGS = [f"-march={args.march}" if f.startswith("-march=") else f for f in slm.native.FLAGS]
    torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model)
    encoded = [tokenizer.encode(p) for p in PROMPTS]
    rows = []
    print(f"{args.model}: {model.num_parameters():,} parameters, {args.threads} threads, {args.steps} steps, "
          f"median of {args.repeats}, native step built with -march={args.march}, {args.weights} weights")
    print(f"{'batch':>5} | {'native ms/step':>14} {'tokens/s':>9} | {'PyTorch ms/step':>15} {'tokens/s':>9} | "
          f"native/PyTorch | same tokens")
    for batch in map(int, args.batches.split(",")):
        prompts = [encoded[i % len(encoded)] for i in range(batch)]
        samples: dict[str, list[float]] = {"native": [], "torch": []}
        tokens: dict[str, list[list[int]]] = {}
        for _ in range(args.repeats):  # interleaved, so the machine's noise hits both alike
            for step in samples:
                weights = args.weights if step == "native" else "fp32"
                ms, tokens[step] = timed_steps(model, prompts, args.steps, step, weights)
                samples[step].append(ms)
        native, torch_ms = (statistics.median(samples[s]) for s in ("native", "torch"))
        row = {"batch": batch, "native_ms": round(native, 3), "torch_ms": round(torch_ms, 3),
               "native_tok_s": round(batch / native * 1000, 1), "torch_tok_s": round(batch / torch_ms * 1000, 1),
               "native_speedup": round(torch_ms / native, 2), "same_tokens": tokens["native"] == tokens["torch"]}
        rows.append(row)
        print(f"{batch:>5} | {native:>14.2f} {row['native_tok_s']:>9.0f} | {torch_ms:>15.2f} "
              f"{row['torch_tok_s']:>9.0f} | {row['native_speedup']:>13.2f}x | {row['same_tokens']}")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "threads": args.threads, "steps": args.steps,
                                         "march": args.march, "weights": args.weights, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
