"""Serving benchmark: N concurrent clients streaming /v1/completions, batched server vs one at a time.

    python benchmarks/serve_bench.py [--model default] [--clients 1,4,16,64] [--tokens 128] [--json FILE]

Starts `slm serve` twice on free ports of 127.0.0.1: once with continuous batching (SLM_MAX_BATCH = the
largest client count) and once with SLM_MAX_BATCH=1, which serves requests one at a time like the original
server. Each client sends one greedy request for exactly --tokens new tokens (`ignore_eos`, so no request
stops early at end-of-text; the tables still count the tokens actually generated).
Figures: aggregate generated tokens/s, p50/p99 latency, p50 time to first token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

import httpx
from common import slm_server


async def one_client(client: httpx.AsyncClient, url: str, prompt: str, tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    start = time.perf_counter()
    first = None
    n = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                n = event["usage"]["completion_tokens"]
            elif first is None:
                first = time.perf_counter() - start
    return {"latency": time.perf_counter() - start, "ttft": first or 0.0, "tokens": n}


async def load(url: str, clients: int, tokens: int) -> dict:
    prompts = [f"Once upon a time there was a {w}" for w in
               ("king", "queen", "boy", "girl", "dog", "cat", "fox", "bird")]
    async with httpx.AsyncClient(timeout=3600) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*[one_client(client, url, prompts[i % len(prompts)], tokens)
                                         for i in range(clients)])
        wall = time.perf_counter() - start
    lat = sorted(r["latency"] for r in results)
    total = sum(r["tokens"] for r in results)
    return {"clients": clients, "tokens": total, "seconds": round(wall, 2), "tokens_per_s": round(total / wall, 1),
            "p50_latency_s": round(statistics.median(lat), 2),
            "p99_latency_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2),
            "p50_ttft_s": round(statistics.median(r["ttft"] for r in results), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    out: dict = {"model": args.model, "tokens_per_request": args.tokens, "threads": args.threads}
    for name, batch in (("batched", max(counts)), ("one_at_a_time", 1)):
        with slm_server(args.model, max_batch=batch, max_queue=1000, threads=args.threads,
                        request_timeout=3600) as url:
            asyncio.run(load(url, 2, 8))  # warm-up
            out[name] = [asyncio.run(load(url, c, args.tokens)) for c in counts]
    print(f"{'clients':>7} | {'batched tok/s':>13} {'p50 s':>6} {'p99 s':>6} {'ttft s':>6} | "
          f"{'1-at-a-time tok/s':>17} {'p50 s':>6} {'p99 s':>6} | speedup")
    for b, s in zip(out["batched"], out["one_at_a_time"], strict=True):
        print(f"{b['clients']:>7} | {b['tokens_per_s']:>13} {b['p50_latency_s']:>6} {b['p99_latency_s']:>6} "
              f"{b['p50_ttft_s']:>6} | {s['tokens_per_s']:>17} {s['p50_latency_s']:>6} {s['p99_latency_s']:>6} | "
              f"{b['tokens_per_s'] / s['tokens_per_s']:.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
