"""What every request passes before the endpoints: bearer-token auth, the request body read whole under a
byte limit and a time limit, per-request metrics and the access log; a plain ASGI middleware.

Plain ASGI rather than FastAPI's @app.middleware("http"): that one (Starlette's BaseHTTPMiddleware) sits
between the endpoint and the client's connection and hides a client that went away from
Request.is_disconnected(), so a non-streamed generation nobody waits for anymore would run to its end.

The body is read here, before routing, counting the bytes as they arrive: a Content-Length is only a
claim, and a chunked body has none, so only counting enforces the limit (and nothing over it is kept).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("slm.server")
access_log = logging.getLogger("slm.access")

OPEN_PATHS = ("/health", "/", "/docs", "/openapi.json", "/metrics")
GENERATION_PATHS = ("/predict", "/v1/completions")  # refused up front while the engine's queue is full
RETRY_AFTER_SECONDS = 1  # what a 429 tells the client to wait


class BodyRefused(Exception):
    def __init__(self, response: JSONResponse) -> None:
        self.response = response


def error(status: int, detail: str, **headers: str) -> JSONResponse:
    return JSONResponse({"detail": detail, "errors": []}, status_code=status, headers=headers or None)


class Guard:
    def __init__(self, app: ASGIApp, api_key: str, max_body_bytes: int, body_timeout: float,
                 count: Callable[[Scope, int], None]) -> None:
        self.app, self.max_body_bytes, self.body_timeout = app, max_body_bytes, body_timeout
        self.expected_auth = f"bearer {api_key}".encode() if api_key else None
        self.count = count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.refuse(scope["path"], Headers(scope=scope))
        if refusal is None:
            try:
                receive = await self.read_body(receive)
            except BodyRefused as e:
                refusal = e.response
        if refusal is not None:
            self.count(scope, refusal.status_code)
            self.log(scope, refusal.status_code, time.perf_counter())
            await refusal(scope, receive, send)
            return
        await self.call_app(scope, receive, send)

    @staticmethod
    def log(scope: Scope, status: int, started: float) -> None:
        client = scope.get("client") or ("-", 0)
        access_log.info('%s:%s "%s %s" %d %.1f ms', client[0], client[1], scope["method"], scope["path"], status,
                        (time.perf_counter() - started) * 1000)

    async def call_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        status: int | None = None
        started = time.perf_counter()

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception:  # never leak a traceback to the client
            log.exception("unhandled error on %s", scope["path"])
            if status is None:
                await error(500, "internal server error")(scope, receive, send)
            status = 500
        self.count(scope, status or 500)  # routing has put the matched route into scope
        self.log(scope, status or 500, started)

    def refuse(self, path: str, headers: Headers) -> JSONResponse | None:
        """The response that turns the request away before anything reads its body, or None to let it in."""
        if self.expected_auth is not None and path not in OPEN_PATHS and not self.authorized(headers):
            return error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return error(413, f"request body over {self.max_body_bytes} bytes")
        return None

    def authorized(self, headers: Headers) -> bool:
        """The scheme is case-insensitive (RFC 7235); the key is compared in constant time."""
        given = headers.get("authorization", "").encode("utf-8", "replace")
        scheme, _, key = given.partition(b" ")
        return hmac.compare_digest(scheme.lower() + b" " + key.strip(), self.expected_auth)

    async def read_body(self, receive: Receive) -> Receive:
        """Read the whole body under the byte and time limits; the app then receives it as one message."""
        try:
            chunks, last = await asyncio.wait_for(self.read_chunks(receive), self.body_timeout)
        except TimeoutError:
            raise BodyRefused(error(408, f"the request body took over {self.body_timeout:g} s to arrive")) from None
        return self.replay(chunks, last, receive)

    async def read_chunks(self, receive: Receive) -> tuple[list[bytes], Message | None]:
        """The body's chunks, or the message that ended it early (the client went away mid-body)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return [], message
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:  # counted as it arrives: chunked bodies have no Content-Length
                raise BodyRefused(error(413, f"request body over {self.max_body_bytes} bytes"))
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return chunks, None

    @staticmethod
    def replay(chunks: list[bytes], last: Message | None, receive: Receive) -> Receive:
        """A receive() that gives the buffered body first, then whatever the connection says next
        (``http.disconnect`` when the client goes away: the endpoints watch for it)."""
        pending: list[Message] = [last or {"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed() -> Message:
            return pending.pop() if pending else await receive()

        return replayed
