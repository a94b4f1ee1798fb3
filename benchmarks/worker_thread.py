"""Why the server builds its engine in a thread that ends: decode speed of one greedy stream, where the steps run.

    python benchmarks/worker_thread.py [--model default] [--tokens 256] [--repeats 3] [--json FILE]

Each case runs in a fresh process (OpenMP's thread teams live as long as the thread that made them):
  main      the steps in the main thread, the model loaded there too (`slm generate`)
  worker    the steps in a worker thread; the model loaded in another thread that stays alive (the server before
            2026-12-07, asyncio.to_thread): two OpenMP teams, more threads than cores on a 2-core machine
  ended     the steps in a worker thread; the model loaded in a thread that has ended (the server now)
libgomp spins between parallel regions only while it has no more threads than cores; past that, every region
(dozens a decode step) starts with a sleep and a wake-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CASES = ("main", "worker", "ended")


def tokens_per_s(model, tokenizer, tokens: int) -> float:
    from slm.generation import Engine, SamplingParams

    engine = Engine(model, tokenizer, max_batch=16)
    seq = engine.add(tokenizer.encode("Once upon a time"), SamplingParams(max_new_tokens=tokens, temperature=0,
                                                                          stop_at_eot=False))
    engine.step()  # the prefill
    started = time.perf_counter()
    while not seq.finished:
        engine.step()
    return (tokens - 1) / (time.perf_counter() - started)


def in_thread(fn, *args):
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fn(*args)))
    thread.start()
    thread.join()
    return result[0]


def run_case(case: str, model_name: str, tokens: int) -> float:
    from slm.checkpoint import load

    if case == "main":
        model, tokenizer = load(model_name)
        return tokens_per_s(model, tokenizer, tokens)
    if case == "worker":
        loader = ThreadPoolExecutor(max_workers=1)  # kept, as asyncio's default executor keeps its threads
        model, tokenizer = loader.submit(load, model_name).result()
        return in_thread(tokens_per_s, model, tokenizer, tokens)
    with ThreadPoolExecutor(max_workers=1) as loader:  # ends with the block
        model, tokenizer = loader.submit(load, model_name).result()
    return in_thread(tokens_per_s, model, tokenizer, tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # one case, in this process
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.case:
        print(run_case(args.case, args.model, args.tokens))
        return
    samples: dict[str, list[float]] = {case: [] for case in CASES}
    for _ in range(args.repeats):  # interleaved, so the machine's noise hits every case alike
        for case in CASES:
            out = subprocess.run([sys.executable, __file__, "--case", case, "--model", args.model,
                                  "--tokens", str(args.tokens)], capture_output=True, text=True, check=True)
            samples[case].append(float(out.stdout.split()[-1]))
    rows = {case: round(statistics.median(v), 1) for case, v in samples.items()}
    print(f"{args.model}, one greedy stream of {args.tokens} tokens, median of {args.repeats}: tokens/s")
    for case, value in rows.items():
        print(f"  {case:<7} {value:>7.1f}  ({value / rows['main']:.2f}x main)")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "tokens": args.tokens, "tokens_per_s": rows},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
