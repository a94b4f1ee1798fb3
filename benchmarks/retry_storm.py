"""Retry-storm benchmark: does the server keep working when far more clients come than it can take?

    python benchmarks/retry_storm.py [--model default] [--clients 16,200] [--seconds 30] [--tokens 64]
                                     [--backoff 0.05] [--json FILE]

Starts `slm serve` (its default settings: batch, queue, timeouts) on a free port of 127.0.0.1, then for each
client count runs that many clients in closed loops for --seconds: each sends a non-streamed
/v1/completions request for exactly --tokens tokens (`ignore_eos`), and on a 429 waits --backoff seconds
and sends it again. Figures per count: completed tokens/s, 429s/s, and p50/p99 latency of the admitted
requests (the 200s). The last line is the ratio of the largest count's tokens/s to the first's, both
measured in this run. The clients run in this process (asyncio), on the same cores as the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

from common import slm_server


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--clients", default="16,200")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--backoff", type=float, default=0.05)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
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
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "seconds": args.seconds, "tokens": args.tokens,
                                               "backoff": args.backoff, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
