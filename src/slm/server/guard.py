"""What every request passes before the endpoints: bearer-token auth, early refusal when the engine's queue
is full, the request body read whole under a byte limit and a time limit, and per-request metrics; a plain
ASGI middleware.

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
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("slm.server")

OPEN_PATHS = ("/health", "/", "/docs", "/openapi.json", "/metrics")
GENERATION_PATHS = ("/predict", "/v1/completions")  # refused up front while the engine's queue is full
RETRY_AFTER_SECONDS = 1


class BodyRefused(Exception):
    def __init__(self, response: JSONResponse) -> None:
        self.response = response


def error(status: int, detail: str, **headers: str) -> JSONResponse:
    return JSONResponse({"detail": detail, "errors": []}, status_code=status, headers=headers or None)


def queue_full() -> JSONResponse:
    return error(429, "the queue is full; retry later", **{"Retry-After": str(RETRY_AFTER_SECONDS)})


class Guard:
    def __init__(self, app: ASGIApp, api_key: str, max_body_bytes: int, body_timeout: float,
                 count: Callable[[Scope, int], None], busy: Callable[[], bool]) -> None:
        self.app, self.max_body_bytes, self.body_timeout = app, max_body_bytes, body_timeout
        self.expected_auth = f"bearer {api_key}".encode() if api_key else None
        self.count, self.busy = count, busy

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
            await refusal(scope, receive, send)
            return
        await self.call_app(scope, receive, send)

    async def call_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        status: int | None = None

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

    def refuse(self, path: str, headers: Headers) -> JSONResponse | None:
        """The response that turns the request away before anything reads its body, or None to let it in."""
        if self.expected_auth is not None and path not in OPEN_PATHS and not self.authorized(headers):
            return error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return error(413, f"request body over {self.max_body_bytes} bytes")
        if path in GENERATION_PATHS and self.busy():  # before the body is read or parsed: a 429 costs ~nothing
            return queue_full()
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
