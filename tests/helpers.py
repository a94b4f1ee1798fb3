"""Helpers the test modules share: a free port, the real `slm serve` in a subprocess, the same app served
by uvicorn in this process (so a test can reach into the engine: slow it down or make it fail), and the
small training settings the training and optimizer tests use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import torch
from torch import nn

from slm.config import ModelConfig
from slm.generation import SamplingParams
from slm.testing import free_port, wait_healthy


@contextmanager
def server(model, **env) -> Iterator[str]:
    """`slm serve` in a subprocess on a free port; settings as SLM_* variables. Yields the base URL."""
    port = free_port()
    full_env = {**os.environ, "SLM_THREADS": "1", **{f"SLM_{k.upper()}": str(v) for k, v in env.items()}}
    proc = subprocess.Popen([sys.executable, "-m", "slm.cli", "serve", "--model", str(model), "--port", str(port)],
                            env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(url, alive=lambda: proc.poll() is None)
        except RuntimeError as e:
            proc.kill()
            raise RuntimeError(f"{e}: {proc.communicate()[0]}") from None
        yield url
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        assert "Traceback" not in out, out


@contextmanager
def app_server(model, **settings) -> Iterator[tuple[str, object]]:
    """The app of `slm serve`, served by uvicorn on a thread of this process. Yields (URL, the ServingEngine)."""
    import uvicorn

    from slm.server.app import create_app
    from slm.server.connections import uvicorn_config
    from slm.server.settings import Settings

    config = Settings(model=str(model), port=free_port(), **settings)
    app = create_app(config)
    uv = uvicorn.Server(uvicorn_config(app, config))
    thread = threading.Thread(target=uv.run, name="test-uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{config.port}"
    try:
        wait_healthy(url, alive=thread.is_alive)
        yield url, app.state.served.engine
    finally:
        uv.should_exit = True
        thread.join(timeout=30)


def fail_sampling_for_seed(monkeypatch, seed: int = 666) -> None:
    """Make slm.generation.sample raise for sequences sampled with ``seed`` (an injected fault), as it is for
    everything the engine runs in this process."""
    import slm.generation as generation

    real = generation.sample

    def sample(logits, params, generator):
        if params.seed == seed:
            raise RuntimeError("injected fault")
        return real(logits, params, generator)

    monkeypatch.setattr(generation, "sample", sample)


def quick_cfg(**kw):
    """A TrainConfig for the tiny preset that trains in a second or two; ``kw`` overrides."""
    from slm.train_config import TrainConfig

    base = dict(preset="tiny", batch_size=8, max_steps=20, lr=2e-3, warmup_steps=5, eval_interval=10,
                eval_windows=8, log_interval=1, seed=1, device="cpu", dtype="fp32")
    return TrainConfig(**{**base, **kw})


# ---- talking to a server
def post(url, path, body, **kw):
    """POST JSON as clients send it: ASCII with \\u escapes, so a lone surrogate can be sent."""
    headers = {"content-type": "application/json", **kw.pop("headers", {})}
    return httpx.post(f"{url}{path}", content=json.dumps(body), headers=headers, **{"timeout": 120, **kw})


def finished_total(url: str, reason: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(f'slm_finished_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


def wait_for_cancel(url: str, before: float) -> float:
    for _ in range(100):  # bounded: 10 s
        if finished_total(url, "cancelled") > before:
            break
        time.sleep(0.1)
    return finished_total(url, "cancelled")


# ---- a fake model for the engines' bookkeeping (tests/test_engine.py, tests/test_serving_engine.py) ----
VOCAB, CONTEXT = 97, 16


class WindowSumModel(nn.Module):
    """Predicts (the sum of every token it can see) mod VOCAB. With a cache it sees only what the cache holds
    (it stores token ids as keys), so cache == no cache only if the engine prefills, moves rows and shifts
    windows exactly right."""

    def __init__(self) -> None:
        super().__init__()
        self.config = ModelConfig(vocab_size=VOCAB, context_length=CONTEXT, n_layer=1, n_head=1, d_model=2)
        self.wte = nn.Embedding(VOCAB, 2)  # only for its device and dtype
        self.calls = 0

    def forward(self, tokens: torch.Tensor, cache=None, logits_at: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        b, t = tokens.shape
        if cache is None:
            assert t <= CONTEXT, "the engine gave the model more than its context"
            sums = tokens.double().cumsum(1)
        else:
            lengths = cache.lengths.clone()
            as_keys = tokens.float()[:, None, :, None].expand(b, 1, t, 2)
            keys, _ = cache.write(0, as_keys, as_keys, cache.uniform_start())  # raises past the context
            slots = torch.arange(keys.shape[2])
            visible = slots[None, None, :] <= (lengths[:, None] + torch.arange(t)[None, :])[:, :, None]
            sums = (keys[:, 0, :, 0].double()[:, None, :] * visible).sum(-1)
            cache.advance(t)
        logits = nn.functional.one_hot(sums.long() % VOCAB, VOCAB).float() * 10
        return logits if logits_at is None else logits[torch.arange(b), logits_at]


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0, stop_at_eot=False, **kw)
