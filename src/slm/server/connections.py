"""Connection limits uvicorn does not have: a deadline for each request's headers.

uvicorn closes an idle keep-alive connection after ``timeout_keep_alive``, but only once a response was
sent, and any byte received cancels that timer: a connection that never sends a whole request (or sends
its headers a byte at a time) would stay open for ever. ``HeaderDeadlineProtocol`` gives every request
``header_timeout`` seconds from the moment the connection is ready for it (opened, or the previous
response sent) until its headers are complete; a late one has its connection closed. Together with
uvicorn's ``limit_concurrency`` (a 503 past ``max_connections``) and the Guard's body deadline, a slow
or idle client holds one socket for a bounded time.
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from slm.server.settings import Settings

log = logging.getLogger("slm.server")


class HeaderDeadlineProtocol(H11Protocol):
    header_timeout = 10.0  # set from the settings by uvicorn_config

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.header_deadline: asyncio.TimerHandle | None = None
        self.arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm_header_deadline()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # the request line and headers are in
            self.disarm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self.arm_header_deadline()  # the next request on this connection gets its own deadline

    def arm_header_deadline(self) -> None:
        self.disarm_header_deadline()
        self.header_deadline = self.loop.call_later(self.header_timeout, self.headers_too_late)

    def disarm_header_deadline(self) -> None:
        if getattr(self, "header_deadline", None) is not None:
            self.header_deadline.cancel()
            self.header_deadline = None

    def headers_too_late(self) -> None:
        self.header_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.info("closing a connection whose request headers took over %g s", self.header_timeout)
            self.transport.close()


def uvicorn_config(app, settings: Settings):
    import uvicorn

    protocol = type("HeaderDeadline", (HeaderDeadlineProtocol,), {"header_timeout": settings.header_timeout})
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info", http=protocol,
                          timeout_keep_alive=settings.keep_alive_timeout,
                          limit_concurrency=settings.max_connections)
