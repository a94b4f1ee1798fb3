"""What the benchmarks share: the real `slm serve` on a free port of 127.0.0.1, and a small corpus of stories
for the runs that train (gpu_check.py). Benchmarks import this, never the tests."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, alive=lambda: True, tries: int = 240) -> None:
    """Poll /health every 0.25 s, a bounded number of times."""
    for _ in range(tries):
        if not alive():
            raise RuntimeError("the server stopped while starting")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"the server did not become healthy in {tries / 4:g} s")


@contextmanager
def slm_server(model: str | Path, **settings: object) -> Iterator[str]:
    """`slm serve --model MODEL` in a subprocess, settings as SLM_* variables; yields its base URL."""
    port = free_port()
    env = {**os.environ, **{f"SLM_{k.upper()}": str(v) for k, v in settings.items()}}
    proc = subprocess.Popen([sys.executable, "-m", "slm.cli", "serve", "--model", str(model), "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, alive=lambda: proc.poll() is None)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


ANIMALS = ["rabbit", "fox", "bear", "duck", "mouse", "owl"]
THINGS = ["a red ball", "an old key", "a small boat", "a shiny stone"]


def write_stories(directory: Path, n_docs: int, seed: int = 0) -> Path:
    """A JSONL file of ``n_docs`` short regular stories: enough structure for a quick training run to learn."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "stories.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n_docs):
            animal, friend, thing = rng.choice(ANIMALS), rng.choice(ANIMALS), rng.choice(THINGS)
            story = (f"Once upon a time a little {animal} found {thing}. The {animal} showed it to a {friend}. "
                     f"\"How nice!\" said the {friend}. They played until the sun went down. The end.")
            f.write(json.dumps({"text": story}) + "\n")
    return path
