"""The server under faults and overload: each test runs its own server (in this process, to reach into the
engine and slow it down or make it fail; or `slm serve` itself for connection handling and auth). The HTTP
contract with one long-running server per family is tests/test_server.py; the limits are docs/serving.md."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest

from conftest import slm_cli
from helpers import app_server, fail_sampling_for_seed, finished_total, post, server, wait_for_cancel
from slm.evaluate import sliding_windows
from slm.testing import free_port


def test_disconnect_cancels_waiting_predict(trained):
    with app_server(trained, max_new_tokens=100_000) as (url, engine):
        slow_down(engine)  # 100,000 tokens take >= 1,000 s: only the client leaving can end this one
        before = finished_total(url, "cancelled")
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/predict", json={**UNENDING, "max_new_tokens": 100_000}, timeout=1.0)
        assert wait_for_cancel(url, before) == before + 1


def slow_down(engine, seconds: float = 0.01) -> None:
    """Every decode step of every variant takes at least ``seconds``: then only a deadline or the length
    limit can end a long generation, on any CPU."""
    for variant in engine.engines.values():
        def step(real=variant.step):
            time.sleep(seconds)
            return real()
        variant.step = step


UNENDING = {"input_text": "Once", "model_type": "untrained", "temperature": 0}  # greedy here never emits EOT


def test_full_queue_answers_429_with_retry_after(trained):
    with app_server(trained, max_batch=1, max_queue=2) as (url, engine):
        slow_down(engine)  # 100 tokens >= 1 s: all ten requests arrive while the first runs

        async def flood():
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(*[client.post(f"{url}/predict", json={**UNENDING, "max_new_tokens": 100})
                                              for _ in range(10)])

        codes = sorted(r.status_code for r in asyncio.run(flood()))
        # Two wait in the queue; a third gets through if the worker admitted the first before the rest came.
        assert codes.count(200) in (2, 3) and codes.count(429) == 10 - codes.count(200), codes
        # Refused before the body is read or parsed (a 429 must cost next to nothing): even a broken body gets it.
        engine.max_queue = 0
        r = httpx.post(f"{url}/predict", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 429 and r.headers["retry-after"] == "1" and "queue is full" in r.json()["detail"]
        engine.max_queue = 2
        assert httpx.get(f"{url}/health").status_code == 200


def test_request_timeout_gives_504(trained):
    with app_server(trained, request_timeout=0.5) as (url, engine):
        slow_down(engine)  # 1,000 tokens take >= 10 s: only the 0.5 s deadline can end these
        r = post(url, "/predict", {**UNENDING, "max_new_tokens": 1000})
        assert r.status_code == 504 and "timeout" in r.json()["detail"]
        body = {"prompt": "Once", "max_tokens": 1000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            lines = [line for line in r.iter_lines() if line]
        # A stream cut short by the deadline ends with an error event (OpenAI's clients raise on it), not "stop".
        assert lines[-1] == "data: [DONE]"
        last = json.loads(lines[-2][6:])
        assert last["error"]["code"] == 504 and "timeout" in last["error"]["message"]
        assert not any('"finish_reason": "stop"' in line for line in lines)


@pytest.fixture
def slow_scoring(monkeypatch):
    """Each batch of scored windows takes >= 50 ms, and is counted: the list grows by one per batch."""
    import slm.server.engine as engine_module

    batches: list[int] = []
    real = engine_module.score_batches

    def score_batches(*args, **kwargs):
        for part in real(*args, **kwargs):
            batches.append(1)
            time.sleep(0.05)
            yield part

    monkeypatch.setattr(engine_module, "score_batches", score_batches)
    return batches


LONG_SCORING = {"prompt": [5, 6, 7, 8] * 1000, "max_tokens": 0, "echo": True, "logprobs": 1}
LONG_WINDOWS = len(sliding_windows(4000, 64, 32))  # batches of one window at the tiny models' context of 64
SHARED_SCORING = {**LONG_SCORING, "prompt": [5, 6, 7, 8] * 300}  # >= 1.8 s of scoring: long beside 8 tokens
SHARED_WINDOWS = len(sliding_windows(1200, 64, 32))


def test_scoring_counts_against_the_request_timeout(trained, slow_scoring):
    with app_server(trained, request_timeout=1.0) as (url, _):
        r = post(url, "/v1/completions", LONG_SCORING)
        assert r.status_code == 504, r.text[:200]
        assert 0 < len(slow_scoring) < LONG_WINDOWS  # stopped at the deadline, not run to its end


def wait_until_steady(counter: list, tries: int = 20) -> int:
    """The counter's length once it stopped growing over half a second (bounded: 10 s)."""
    last = -1
    for _ in range(tries):
        if len(counter) == last:
            break
        last = len(counter)
        time.sleep(0.5)
    return len(counter)


def test_scoring_stops_when_the_client_goes_away(trained, slow_scoring):
    with app_server(trained) as (url, _):
        with pytest.raises(httpx.ReadTimeout):
            post(url, "/v1/completions", LONG_SCORING, timeout=1.0)
        assert 0 < wait_until_steady(slow_scoring) < LONG_WINDOWS * 0.8


def test_scoring_shares_the_worker_with_decoding(trained, slow_scoring):
    with app_server(trained) as (url, _):
        scoring = {}
        thread = threading.Thread(target=lambda: scoring.update(r=post(url, "/v1/completions", SHARED_SCORING)))
        thread.start()
        for _ in range(100):  # bounded: 10 s
            if slow_scoring:
                break
            time.sleep(0.1)
        r = post(url, "/v1/completions", {"prompt": "Once", "max_tokens": 8, "ignore_eos": True, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        assert "r" not in scoring and len(slow_scoring) < SHARED_WINDOWS  # the 8 tokens did not wait for the job
        thread.join(timeout=60)
        assert scoring["r"].status_code == 200 and len(slow_scoring) == SHARED_WINDOWS


def test_a_failing_decode_step_fails_only_its_requests(trained):
    with app_server(trained) as (url, engine):
        cached = engine.engines["cached"]

        def failing_step(real=cached.step):
            cached.step = real  # fail once
            raise RuntimeError("injected fault")

        cached.step = failing_step
        r = post(url, "/v1/completions", {"prompt": "Once", "max_tokens": 4})
        assert r.status_code == 500 and "req-" in r.json()["detail"] and "carries on" in r.json()["detail"]
        for model_type in ("cached", "basic"):
            assert post(url, "/predict", {"input_text": "Once", "max_new_tokens": 4,
                                          "model_type": model_type}).status_code == 200
        health = httpx.get(f"{url}/health").json()
        assert health["status"] == "ok" and health["engine_restarts"] == 0


def test_a_sampling_failure_ends_only_its_own_sequence(trained, monkeypatch):
    fail_sampling_for_seed(monkeypatch, 666)
    with app_server(trained) as (url, _):
        bodies = [{"input_text": "Once upon a time", "max_new_tokens": 30, "temperature": 1.0, "seed": seed}
                  for seed in (1, 2, 666, 3)]
        alone = [post(url, "/predict", b).json().get("result") for b in bodies]

        async def together():
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(*[client.post(f"{url}/predict", json=b) for b in bodies])

        responses = asyncio.run(together())
        assert [r.status_code for r in responses] == [200, 200, 500, 200]
        assert [r.json()["result"] for i, r in enumerate(responses) if i != 2] == [alone[0], alone[1], alone[3]]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's death, on purpose
def test_a_dead_worker_is_restarted(trained):
    with app_server(trained) as (url, engine):
        def die(real=engine._admit):
            engine._admit = real
            raise SystemExit  # not an Exception: the worker thread ends (as it would on a bug we cannot catch)

        engine._admit = die
        r = post(url, "/predict", {"input_text": "Once", "max_new_tokens": 4}, timeout=30)
        assert r.status_code == 500 and "req-" in r.json()["detail"]  # answered, not left waiting
        health = httpx.get(f"{url}/health").json()
        assert health["status"] == "ok" and health["engine_restarts"] == 1
        assert post(url, "/predict", {"input_text": "Once", "max_new_tokens": 4}).status_code == 200


def test_long_tokenization_does_not_stall_the_event_loop(trained):
    with app_server(trained) as (url, engine):
        started, release = threading.Event(), threading.Event()
        real = engine.tokenizer.encode

        def slow_encode(text):
            if len(text) > 10_000:
                started.set()
                release.wait(20)
            return real(text)

        engine.tokenizer.encode = slow_encode
        result = {}
        thread = threading.Thread(target=lambda: result.update(r=post(url, "/tokenize", {"prompt": "a b " * 5000})))
        thread.start()
        assert started.wait(20)
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # served while the tokenizer works
        release.set()
        thread.join(timeout=30)
        assert result["r"].status_code == 200 and result["r"].json()["count"] > 0


def closed_by_server(sock: socket.socket, send: bytes = b"", tries: int = 100) -> bool:
    """Send ``send`` a byte every 0.1 s (or just wait); True once the server has closed the connection."""
    sock.settimeout(0.1)
    for i in range(tries):
        try:
            if send:
                sock.sendall(send[i % len(send): i % len(send) + 1])
            if sock.recv(1) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:  # reset or broken pipe: closed
            return True
    return False


@pytest.mark.slow  # `slm serve` in its own process (make test runs it)
def test_idle_and_trickling_connections_are_closed(trained):
    with server(trained, header_timeout=0.5) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as idle, \
                socket.create_connection(("127.0.0.1", port)) as trickle:
            trickle.sendall(b"GET /health HTTP/1.1\r\n")
            assert closed_by_server(trickle, send=b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaa")  # headers never end
            assert closed_by_server(idle)
        assert httpx.get(f"{url}/health").status_code == 200


@pytest.mark.slow  # `slm serve` in its own process (make test runs it)
def test_connections_are_capped(trained):
    with server(trained, max_connections=4) as url:
        port = int(url.rsplit(":", 1)[1])
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(6)]
        try:
            time.sleep(0.2)  # let the server accept them
            assert httpx.get(f"{url}/health").status_code == 503
        finally:
            for sock in held:
                sock.close()
        for _ in range(50):  # bounded: the closed sockets are noticed within a few event-loop turns
            if httpx.get(f"{url}/health").status_code == 200:
                break
            time.sleep(0.1)
        assert httpx.get(f"{url}/health").status_code == 200


@pytest.mark.slow  # `slm serve` in its own process (make test runs it)
def test_bearer_token_auth_and_cors(trained):
    origin = "http://localhost:8501"
    with server(trained, api_key="sekrit", cors_origins=origin) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        r = post(url, "/predict", {"input_text": "hi", "max_new_tokens": 3})
        assert r.status_code == 401 and "API key" in r.json()["detail"]
        r = post(url, "/predict", {"input_text": "hi", "max_new_tokens": 3}, headers={"Authorization": "Bearer no"})
        assert r.status_code == 401
        r = post(url, "/predict", {"input_text": "hi", "max_new_tokens": 3},
                 headers={"Authorization": "Bearer sekrit"})
        assert r.status_code == 200
        r = post(url, "/predict", {"input_text": "hi", "max_new_tokens": 3},
                 headers={"Authorization": "bearer sekrit"})  # the scheme is case-insensitive (RFC 7235)
        assert r.status_code == 200
        r = post(url, "/predict", {"input_text": "hi", "max_new_tokens": 3}, headers={"Authorization": "sekrit"})
        assert r.status_code == 401
        # A browser's preflight carries no credentials: CORS answers it before the key is checked.
        r = httpx.options(f"{url}/predict", headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                                     "Access-Control-Request-Headers": "authorization"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        r = httpx.options(f"{url}/predict", headers={"Origin": "http://evil.example",
                                                     "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in r.headers


def test_serve_refuses_a_missing_model():
    r = slm_cli("serve", "--model", "/nonexistent/model", "--port", str(free_port()))
    assert r.returncode == 2 and "checkpoint directory not found" in r.stderr


def test_the_engine_is_built_in_a_thread_that_ends(trained, monkeypatch):
    """Loading the model gives the loading thread torch's OpenMP threads; kept alive beside the engine's worker,
    they outnumber a small machine's cores and every decode step slows (docs/decode-speed.md). So the
    engine is built in a thread of its own, which has ended by the time the server answers."""
    import slm.server.app as server_app

    builders, real = [], server_app.build_engine

    def build_engine(*args):
        builders.append(threading.current_thread())
        return real(*args)

    monkeypatch.setattr(server_app, "build_engine", build_engine)
    with app_server(trained) as (url, _):
        assert httpx.get(f"{url}/health").status_code == 200
        [builder] = builders
        assert builder.name != "test-uvicorn" and not builder.is_alive()
