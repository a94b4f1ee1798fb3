"""The endpoints: /, /health, /predict, /v1/completions (with SSE streaming), /v1/models, /metrics.

Each endpoint reads on its own; what they share (the engine, settings, metrics) comes from the
``served`` dependency, and the request plumbing (prompt checks, submit, wait, cancel) from small functions.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import slm
from slm.generation import SamplingParams, SequenceState
from slm.server.engine import QueueFull, ServingEngine
from slm.server.engine import Request as GenRequest
from slm.server.metrics import Metrics
from slm.server.schemas import CompletionRequest, PredictRequest, PredictResponse
from slm.server.settings import Settings

router = APIRouter()


@dataclass
class Served:
    """What the endpoints work with (on ``app.state.served``); the engine and info arrive at start-up."""

    settings: Settings
    metrics: Metrics
    engine: ServingEngine | None = None
    info: dict | None = None

    @property
    def running(self) -> bool:
        return self.engine is not None and self.engine.alive

    def model_id(self) -> str:
        return self.info["name"] if self.info else "slm"


def served(request: Request) -> Served:
    return request.app.state.served


def running_engine(s: Served) -> ServingEngine:
    if not s.running:
        raise HTTPException(503, "the model is not loaded or the engine is not running")
    return s.engine


# ---- request plumbing -----------------------------------------------------------------------------------
def sampling_params(s: Served, max_new: int, temperature: float, top_k, top_p, seed, stop=(),
                    ignore_eos: bool = False, controls: dict | None = None) -> SamplingParams:
    if max_new > s.settings.max_new_tokens:
        raise HTTPException(422, f"max_new_tokens/max_tokens: at most {s.settings.max_new_tokens}, got {max_new}")
    return SamplingParams(max_new, temperature, top_k or None, top_p, seed, tuple(stop or ()),
                          stop_at_eot=not ignore_eos, **(controls or {}))


def encode_prompt(s: Served, text: str, field: str) -> list[int]:
    if len(text) > s.settings.max_prompt_chars:
        raise HTTPException(422, f"{field}: at most {s.settings.max_prompt_chars} characters, got {len(text)}")
    ids = running_engine(s).tokenizer.encode(text)
    if not ids:
        raise HTTPException(422, f"{field}: the prompt encodes to no tokens")
    return ids


def submit(s: Served, variant: str, ids: list[int], params: SamplingParams, stream: bool = False) -> GenRequest:
    req = GenRequest(variant, ids, params, asyncio.get_running_loop(),
                     deadline=time.perf_counter() + s.settings.request_timeout, wants_text=stream)
    try:
        running_engine(s).submit(req)
    except QueueFull as e:
        raise HTTPException(429, str(e)) from e
    return req


async def events(s: Served, req: GenRequest, http: Request) -> AsyncIterator[tuple[str, object]]:
    """The request's events until it is done; a client that goes away cancels the generation."""
    checked = time.monotonic()
    try:
        while True:
            try:
                event = await asyncio.wait_for(req.events.get(), timeout=0.5)
            except TimeoutError:
                event = None
            # Look for a gone client every half second, also while text keeps coming, so that a
            # generation nobody will read stops within a second, streamed or not.
            if time.monotonic() - checked >= 0.5:
                checked = time.monotonic()
                if await http.is_disconnected():
                    running_engine(s).cancel(req)
                    return
            if event is None:
                continue
            kind, payload = event
            yield kind, payload
            if kind in ("done", "error"):
                return
    finally:
        if not req.cancelled and (req.seq is None or not req.seq.finished):
            running_engine(s).cancel(req)


async def run_to_end(s: Served, req: GenRequest, http: Request) -> SequenceState:
    seq = None
    async for kind, payload in events(s, req, http):
        if kind == "error":
            raise HTTPException(500, str(payload))
        if kind == "done":
            seq = payload
    if seq is None or seq.finish_reason == "cancelled":
        raise HTTPException(499, "client closed the request")
    if seq.finish_reason == "timeout":
        raise HTTPException(504, f"generation took longer than the request timeout ({s.settings.request_timeout} s)")
    return seq


def timing(started: float, n: int) -> dict:
    """Measured in the server, as /predict's "time" is, so clients compare like with like."""
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 4), "tokens_per_second": round(n / seconds, 2) if seconds else 0.0}


# ---- endpoints ------------------------------------------------------------------------------------------
@router.get("/")
async def root(s: Served = Depends(served)):
    return {"name": "slm", "version": slm.__version__, "device": "cpu", "model": s.info,
            "model_types": ["untrained", "basic", "cached"], "docs": "/docs"}


@router.get("/health")
async def health(s: Served = Depends(served)):
    if not s.running:
        return JSONResponse({"status": "unavailable"}, status_code=503)
    return {"status": "ok", "model": s.model_id(), "queue_depth": s.engine.queue_depth}


@router.post("/predict", response_model=PredictResponse)
async def predict(body: PredictRequest, http: Request, s: Served = Depends(served)):
    params = sampling_params(s, body.max_new_tokens, body.temperature, body.top_k, body.top_p, body.seed,
                             controls=body.controls())
    ids = encode_prompt(s, body.input_text, "input_text")
    started = time.perf_counter()
    seq = await run_to_end(s, submit(s, body.model_type, ids, params), http)
    seconds = time.perf_counter() - started
    n = len(seq.generated)
    s.metrics.generated(body.model_type, "/predict", n, seconds)
    return PredictResponse(
        result=seq.text, time=round(seconds, 4), model_type=body.model_type, prompt_tokens=len(ids),
        generated_tokens=n, tokens_per_second=round(n / seconds, 2) if seconds > 0 else 0.0,
        finish_reason=seq.finish_reason or "length", prompt_truncated_tokens=seq.prompt_truncated,
        settings={"max_new_tokens": body.max_new_tokens, "temperature": body.temperature, "top_k": body.top_k,
                  "top_p": body.top_p, "seed": body.seed, "kv_cache": body.model_type != "basic", **body.controls()},
    )


class Completion:
    """OpenAI's text_completion objects for one request."""

    def __init__(self, s: Served, prompt_tokens: int) -> None:
        self.id, self.created, self.model = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), s.model_id()
        self.prompt_tokens, self.started = prompt_tokens, time.perf_counter()

    def chunk(self, text: str, finish: str | None) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

    def final(self, text: str, seq: SequenceState) -> dict:
        n = len(seq.generated)
        out = self.chunk(text, "length" if seq.finish_reason == "length" else "stop")
        out["usage"] = {"prompt_tokens": self.prompt_tokens, "completion_tokens": n,
                        "total_tokens": self.prompt_tokens + n}
        out["timing"] = timing(self.started, n)
        return out


@router.post("/v1/completions")
async def completions(body: CompletionRequest, http: Request, s: Served = Depends(served)):
    params = sampling_params(s, body.max_tokens, body.temperature, body.top_k, body.top_p, body.seed, body.stop,
                             body.ignore_eos, body.controls())
    ids = encode_prompt(s, body.prompt, "prompt")
    completion = Completion(s, len(ids))
    req = submit(s, "cached", ids, params, stream=body.stream)
    if not body.stream:
        seq = await run_to_end(s, req, http)
        s.metrics.generated("cached", "/v1/completions", len(seq.generated), time.perf_counter() - completion.started)
        return completion.final(seq.text, seq)

    async def sse() -> AsyncIterator[str]:
        async for kind, payload in events(s, req, http):
            if kind == "text":
                yield f"data: {json.dumps(completion.chunk(payload, None))}\n\n"
            elif kind == "error":
                yield f"data: {json.dumps({'error': {'message': str(payload)}})}\n\n"
                return
            elif kind == "done" and payload is not None:
                s.metrics.generated("cached", "/v1/completions", len(payload.generated),
                                    time.perf_counter() - completion.started)
                yield f"data: {json.dumps(completion.final('', payload))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/v1/models")
async def models(s: Served = Depends(served)):
    return {"object": "list", "data": [{"id": s.model_id(), "object": "model", "created": 0, "owned_by": "slm"}]}


@router.get("/metrics")
async def prometheus(s: Served = Depends(served)):
    if s.engine is not None:
        s.metrics.queue(s.engine.queue_depth)
    return Response(generate_latest(s.metrics.registry), media_type=CONTENT_TYPE_LATEST)
