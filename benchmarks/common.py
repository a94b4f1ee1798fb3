"""What the benchmarks share: the real `slm serve` on a free port of 127.0.0.1, and a small corpus of stories
for the runs that train (gpu_check.py). Benchmarks import this, never the tests."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from slm.testing import free_port, wait_healthy


@contextmanager
def slm_server(model: str | Path, **settings: object) -> Iterator[str]:
    """`slm serve --model MODEL` in a subprocess, settings as SLM_* variables; yields its base URL."""
    port = free_port()
    env = {**os.environ, **{f"SLM_{k.upper()}": str(v) for k, v in settings.items()}}
    proc = subprocess.Popen([sys.executable, "-m", "slm.cli", "serve", "--model", str(model), "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, alive=lambda: proc.poll() is None, tries=240)
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
