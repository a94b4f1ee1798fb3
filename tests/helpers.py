"""Helpers the test modules share: a free port, the real `slm serve` in a subprocess, the same app served
by uvicorn in this process (so a test can reach into the engine: slow it down or make it fail), and the
small training settings the training and optimizer tests use."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, alive=lambda: True, tries: int = 120) -> None:
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
    from slm.train import TrainConfig

    base = dict(preset="tiny", batch_size=8, max_steps=20, lr=2e-3, warmup_steps=5, eval_interval=10,
                eval_windows=8, log_interval=1, seed=1, device="cpu", dtype="fp32")
    return TrainConfig(**{**base, **kw})
