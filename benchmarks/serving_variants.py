"""How a request without the KV cache (the playground's "basic" comparison) slows cached requests beside it,
with the serving engine's worker shared by turns (each busy variant one step per round, as before) and by time
(the variant that has had the least worker time steps next: slm.server.engine).

    python benchmarks/serving_variants.py [--model default] [--json benchmarks/serving-variants.json]

In-process, on the real model: a basic request writes --basic-tokens greedy tokens; once it has
--head-start of them, --cached cached requests of --tokens tokens each join. Figures: the cached requests'
tokens/s together (alone, beside the basic one by turns, by time), and the basic one's tokens/s while they ran.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from slm import checkpoint
from slm.generation import Engine, SamplingParams
from slm.server.engine import GenerationRequest, ServingEngine


class ByTurns(ServingEngine):
    """The old schedule: every busy variant steps once per round, whatever its step costs."""

    turn = 0

    def _next_variant(self) -> str | None:
        busy = [name for name, engine in self.engines.items() if engine.active]
        self.turn += 1
        return busy[self.turn % len(busy)] if busy else None


def greedy(tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=tokens, temperature=0, stop_at_eot=False)


async def done(request: GenerationRequest) -> None:
    while (await request.events.get())[0] not in ("done", "error"):
        pass


async def scenario(engine: ServingEngine, args: argparse.Namespace, with_basic: bool) -> dict:
    loop = asyncio.get_running_loop()
    prompt = engine.tokenizer.encode("Once upon a time")
    basic = GenerationRequest("basic", prompt, greedy(args.basic_tokens), loop, wants_text=False)
    if with_basic:
        engine.submit(basic)
        while basic.seq is None or len(basic.seq.generated) < args.head_start:
            await asyncio.sleep(0.01)
    cached = [GenerationRequest("cached", prompt, greedy(args.tokens), loop, wants_text=False)
              for _ in range(args.cached)]
    basic_before, started = len(basic.seq.generated) if with_basic else 0, time.perf_counter()
    for request in cached:
        engine.submit(request)
    for request in cached:
        await done(request)
    seconds = time.perf_counter() - started
    basic_during = (len(basic.seq.generated) - basic_before) if with_basic else 0
    if with_basic:
        engine.cancel(basic)
        await done(basic)
    return {"cached_tokens_per_s": args.cached * args.tokens / seconds, "basic_tokens_per_s": basic_during / seconds}


def measure(kind: type[ServingEngine], model, tokenizer, args: argparse.Namespace, with_basic: bool) -> dict:
    engines = {"cached": Engine(model, tokenizer, max_batch=8), "basic": Engine(model, tokenizer, use_cache=False)}
    engine = kind(engines, tokenizer)
    engine.start()
    try:
        return asyncio.run(scenario(engine, args, with_basic))
    finally:
        engine.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--cached", type=int, default=4, help="cached requests")
    ap.add_argument("--tokens", type=int, default=100, help="tokens per cached request")
    ap.add_argument("--basic-tokens", type=int, default=500)
    ap.add_argument("--head-start", type=int, default=300, help="basic tokens before the cached requests join")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with ThreadPoolExecutor(max_workers=1) as loader:  # loaded as the server loads it (benchmarks/worker_thread.py)
        model, tokenizer = loader.submit(checkpoint.load, args.model).result()
    rows = {"alone": measure(ServingEngine, model, tokenizer, args, with_basic=False),
            "beside basic, by turns": measure(ByTurns, model, tokenizer, args, with_basic=True),
            "beside basic, by time": measure(ServingEngine, model, tokenizer, args, with_basic=True)}
    alone = rows["alone"]["cached_tokens_per_s"]
    print(f"{args.cached} cached requests x {args.tokens} tokens; a basic request at {args.head_start}+ tokens\n")
    print("| schedule | cached tokens/s | vs alone | basic tokens/s meanwhile |\n|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['cached_tokens_per_s']:.0f} | {row['cached_tokens_per_s'] / alone:.2f}x | "
              f"{row['basic_tokens_per_s']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
