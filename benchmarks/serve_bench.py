"""Serving benchmark: throughput and latency under N clients, and overload (a retry storm).

    python benchmarks/serve_bench.py [--model default] [--clients 1,4,16,64] [--tokens 128] [--json FILE]
    python benchmarks/serve_bench.py --retry-storm [--clients 16,200] [--seconds 30] [--tokens 64]
                                     [--backoff 0.05] [--json FILE]

Throughput (the default): starts `slm serve` twice on free ports of 127.0.0.1, once with continuous batching
(SLM_MAX_BATCH = the largest client count) and once with SLM_MAX_BATCH=1, which serves requests one at a time.
Each client sends one greedy streaming request for exactly --tokens new tokens (`ignore_eos`). Figures:
aggregate generated tokens/s, p50/p99 latency, p50 time to first token.

--retry-storm: one server with its default settings (batch, queue, timeouts); for each client count that many
clients run closed loops for --seconds, each sending a non-streamed request for exactly --tokens tokens and, on
a 429, waiting --backoff seconds and sending it again. Figures per count: completed tokens/s, 429s/s, p50/p99
latency of the admitted requests; the last line is the largest count's tokens/s over the first's. The clients
run in this process (asyncio) on the same cores as the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

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


# ---- the retry storm ---------------------------------------------------------------------------------
class Connection:
    """A minimal HTTP/1.1 keep-alive client (asyncio streams): the storm's clients share the server's two
    cores, so what a request costs the client must stay small next to what it costs the server."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                      if line.startswith(b"content-length:"))
        data = await self.reader.readexactly(length)
        if b"connection: close" in head.lower():
            self.close()
        return status, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def client_loop(port: int, body: bytes, until: float, backoff: float, stats: dict) -> None:
    conn = Connection(port)
    while time.perf_counter() < until:
        start = time.perf_counter()
        try:
            status, data = await conn.post("/v1/completions", body)
        except (OSError, asyncio.IncompleteReadError, ValueError, StopIteration):
            stats["errors"] += 1
            conn.close()
            await asyncio.sleep(backoff)
            continue
        if status == 429:
            stats["refused"] += 1
            await asyncio.sleep(backoff)
        elif status == 200:
            if time.perf_counter() <= until:  # only requests that finished inside the window count
                stats["tokens"] += json.loads(data)["usage"]["completion_tokens"]
                stats["latencies"].append(time.perf_counter() - start)
        else:
            stats["errors"] += 1
            stats["statuses"].add(status)
    conn.close()


async def storm(port: int, clients: int, seconds: float, tokens: int, backoff: float) -> dict:
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": tokens, "temperature": 0.8,
                       "ignore_eos": True}).encode()
    stats = {"tokens": 0, "refused": 0, "errors": 0, "latencies": [], "statuses": set()}
    until = time.perf_counter() + seconds
    await asyncio.gather(*[client_loop(port, body, until, backoff, stats) for _ in range(clients)])
    lat = sorted(stats["latencies"]) or [float("nan")]
    return {"clients": clients, "tokens_per_s": round(stats["tokens"] / seconds, 1),
            "refused_per_s": round(stats["refused"] / seconds, 1), "errors": stats["errors"],
            "statuses": sorted(stats["statuses"]), "admitted": len(stats["latencies"]),
            "p50_latency_s": round(statistics.median(lat), 2),
            "p99_latency_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2)}


def throughput(args: argparse.Namespace) -> dict:
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
    return out


def retry_storm(args: argparse.Namespace) -> dict:
    with slm_server(args.model) as url:
        port = int(url.rsplit(":", 1)[1])
        asyncio.run(storm(port, 2, 3, 8, args.backoff))  # warm-up (the native step is built on first use)
        rows = [asyncio.run(storm(port, int(c), args.seconds, args.tokens, args.backoff))
                for c in args.clients.split(",")]
    print(f"{'clients':>7} | {'tokens/s':>8} {'429/s':>7} {'admitted':>8} {'p50 s':>6} {'p99 s':>6} {'errors':>6}")
    for r in rows:
        print(f"{r['clients']:>7} | {r['tokens_per_s']:>8} {r['refused_per_s']:>7} {r['admitted']:>8} "
              f"{r['p50_latency_s']:>6} {r['p99_latency_s']:>6} {r['errors']:>6}")
    first, last = rows[0], rows[-1]
    print(f"{last['clients']} vs {first['clients']} clients: "
          f"tokens/s x{last['tokens_per_s'] / first['tokens_per_s']:.2f}, "
          f"p99 x{last['p99_latency_s'] / first['p99_latency_s']:.2f}")
    return {"model": args.model, "seconds": args.seconds, "tokens": args.tokens, "backoff": args.backoff,
            "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--retry-storm", action="store_true", help="overload instead of throughput")
    parser.add_argument("--clients", default=None, help="client counts (default 1,4,16,64; storm 16,200)")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens a request (default 128; storm 64)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=30, help="storm: seconds per client count")
    parser.add_argument("--backoff", type=float, default=0.05, help="storm: seconds a client waits after a 429")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    args.clients = args.clients or ("16,200" if args.retry_storm else "1,4,16,64")
    args.tokens = args.tokens or (64 if args.retry_storm else 128)
    out = retry_storm(args) if args.retry_storm else throughput(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
