"""Bearer-token auth, the request body limit and per-request metrics, as a plain ASGI middleware.

Plain ASGI rather than FastAPI's @app.middleware("http"): that one (Starlette's BaseHTTPMiddleware) sits
between the endpoint and the client's connection and hides a client that went away from
Request.is_disconnected(), so a non-streamed generation nobody waits for anymore would run to its end.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("slm.server")

OPEN_PATHS = ("/health", "/", "/docs", "/openapi.json", "/metrics")


class Guard:
    def __init__(self, app: ASGIApp, api_key: str, max_body_bytes: int,
                 count: Callable[[Scope, int], None]) -> None:
        self.app, self.api_key, self.max_body_bytes, self.count = app, api_key, max_body_bytes, count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, headers = scope["path"], Headers(scope=scope)
        refusal = self.refuse(path, headers)
        if refusal is not None:
            self.count(scope, refusal.status_code)
            await refusal(scope, receive, send)
            return

        status: int | None = None

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception:  # never leak a traceback to the client
            log.exception("unhandled error on %s", path)
            if status is None:
                await JSONResponse({"detail": "internal server error"}, status_code=500)(scope, receive, send)
            status = 500
        self.count(scope, status or 500)  # routing has put the matched route into scope

    def refuse(self, path: str, headers: Headers) -> JSONResponse | None:
        """The response that turns the request away before anything reads its body, or None to let it in."""
        if (self.api_key and path not in OPEN_PATHS
                and headers.get("authorization", "") != f"Bearer {self.api_key}"):
            return JSONResponse({"detail": "missing or wrong API key: send 'Authorization: Bearer <key>'"},
                                status_code=401)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return JSONResponse({"detail": f"request body over {self.max_body_bytes} bytes"}, status_code=413)
        return None
