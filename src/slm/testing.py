"""For programs that start a real `slm serve` and talk to it (the tests, the benchmarks): a free local port,
and a bounded wait until the server answers /health. Nothing in slm itself imports this."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, alive: Callable[[], bool] = lambda: True, tries: int = 120) -> None:
    """Poll /health every 0.25 s, a bounded number of times; stop early if ``alive()`` says the server died."""
    import httpx  # the serve extra's client: only the programs that wait for a server need it

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
