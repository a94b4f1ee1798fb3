"""Server settings: defaults, overridden by SLM_* environment variables, overridden by CLI flags."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from slm.config import ConfigError


@dataclass
class Settings:
    model: str = "default"  # checkpoint directory or "default" (SLM_MODEL)
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 16  # sequences decoded together per model
    # Requests waiting for a batch slot; beyond this, 429. One batch's worth: an admitted request waits about
    # one generation at most (docs/serving.md measures 16, 32 and 64 under a retry storm).
    max_queue: int = 16
    shed_delay: float = 1.0  # seconds a refused generation is held before its 429 (= Retry-After; tames storms)
    max_new_tokens: int = 1024  # upper bound a request may ask for
    max_prompt_chars: int = 20_000  # characters of one text prompt
    max_prompt_tokens: int = 16_384  # tokens of all a request's prompts together (text or token ids)
    max_body_bytes: int = 1_000_000  # counted as the bytes arrive, chunked or not
    request_timeout: float = 120.0  # seconds a request may take in all, generation and scoring
    header_timeout: float = 10.0  # seconds a connection may take to send a request's headers
    body_timeout: float = 30.0  # seconds a client may take to send a request's body
    keep_alive_timeout: float = 5.0  # seconds an idle keep-alive connection is kept open
    max_connections: int = 512  # open connections and requests in progress; beyond this, 503
    api_key: str = ""  # when set, requests need "Authorization: Bearer <key>"
    cors_origins: str = ""  # comma-separated origins; empty = CORS off
    threads: int = 0  # torch CPU threads; 0 = torch's default

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"port {self.port}: choose one from 1 to 65535 (--port or SLM_PORT)")

    @classmethod
    def from_env(cls, **overrides) -> Settings:
        values = {}
        for f in dataclasses.fields(cls):
            raw = os.environ.get(f"SLM_{f.name.upper()}")
            if raw is not None and raw != "":
                try:
                    values[f.name] = type(f.default)(raw)
                except ValueError as e:
                    raise ConfigError(f"SLM_{f.name.upper()}={raw!r}: expected {type(f.default).__name__}") from e
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
