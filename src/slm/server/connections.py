"""The server's connections: a deadline for each request's headers, the early refusal of generations the
engine has no room for, and the uvicorn configuration that puts them together.

uvicorn closes an idle keep-alive connection after ``timeout_keep_alive``, but only once a response was
sent, and any byte received cancels that timer: a connection that never sends a whole request (or sends
its headers a byte at a time) would stay open for ever. ``HeaderDeadlineProtocol`` gives every request
``header_timeout`` seconds from the moment the connection is ready for it (opened, or the previous
response sent) until its headers are complete; a late one has its connection closed. Together with
uvicorn's ``limit_concurrency`` (a 503 past ``max_connections``) and the Guard's body deadline, a slow or
idle client holds one socket for a bounded time. httptools (a C parser) reads the requests: it costs a
quarter of h11's time per request, which is what a refusal costs the server under a retry storm.
"""

from __future__ import annotations

import asyncio
import logging
import time

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from slm.server.guard import GENERATION_PATHS, RETRY_AFTER_SECONDS
from slm.server.settings import Settings

log = logging.getLogger("slm.server")


class HeaderDeadlineProtocol(HttpToolsProtocol):
    header_timeout = 10.0  # set from the settings by uvicorn_config

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.header_deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self.arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm_header_deadline()
        super().connection_lost(exc)

    def on_headers_complete(self) -> None:
        self.disarm_header_deadline()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self.arm_header_deadline()  # the next request on this connection gets its own deadline

    def arm_header_deadline(self) -> None:
        self.disarm_header_deadline()
        self.header_deadline = self.loop.call_later(self.header_timeout, self.headers_too_late)

    def disarm_header_deadline(self) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
            self.header_deadline = None

    def headers_too_late(self) -> None:
        self.header_deadline = None
        in_progress = self.cycle is not None and not self.cycle.response_complete
        if not in_progress and not self.transport.is_closing():
            log.info("closing a connection whose request headers took over %g s", self.header_timeout)
            self.transport.close()


class Shed:
    """The outermost ASGI layer: while the engine's queue is full, a generation request is answered 429
    before anything else runs (no body read, no parsing, no middleware, no access-log line), after
    ``delay`` seconds. The delay costs the server nothing (a timer), and it is what keeps a retry storm
    from turning into thousands of refusals a second that would take the CPU from decoding. Refusals are
    counted by the metrics and logged as a count every ``LOG_EVERY`` seconds."""

    LOG_EVERY = 10.0

    def __init__(self, app, busy, delay: float, count) -> None:
        self.app, self.busy, self.delay, self.count = app, busy, delay, count
        self.body = b'{"detail":"the queue is full; retry later","errors":[]}'
        self.start = {"type": "http.response.start", "status": 429,
                      "headers": [(b"content-type", b"application/json"),
                                  (b"retry-after", str(RETRY_AFTER_SECONDS).encode()),
                                  (b"content-length", str(len(self.body)).encode())]}
        self.refused, self.logged = 0, time.monotonic()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] not in GENERATION_PATHS or not self.busy():
            await self.app(scope, receive, send)
            return
        self.count(scope, 429)
        self.note_refusal()
        if self.delay:
            await asyncio.sleep(self.delay)
        await send(self.start)
        await send({"type": "http.response.body", "body": self.body})

    def note_refusal(self) -> None:
        self.refused += 1
        if time.monotonic() - self.logged >= self.LOG_EVERY:
            log.warning("queue full: refused %d generation requests in the last %.0f s", self.refused,
                        time.monotonic() - self.logged)
            self.refused, self.logged = 0, time.monotonic()


def uvicorn_config(app, settings: Settings):
    """uvicorn's settings for ``app`` (from create_app): our protocol, timeouts, connection cap, Shed."""
    import uvicorn

    served = app.state.served
    outer = Shed(app, lambda: served.engine is not None and served.engine.full, settings.shed_delay,
                 app.state.count)
    protocol = type("HeaderDeadline", (HeaderDeadlineProtocol,), {"header_timeout": settings.header_timeout})
    # The Guard writes the access log, so that a shed 429 costs no log line.
    return uvicorn.Config(outer, host=settings.host, port=settings.port, log_level="info", http=protocol,
                          access_log=False, timeout_keep_alive=settings.keep_alive_timeout,
                          limit_concurrency=settings.max_connections)
