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
from slm.evaluate import TokenScores
from slm.generation import SamplingParams, SequenceState
from slm.server.engine import QueueFull, ServingEngine
from slm.server.engine import Request as GenRequest
from slm.server.metrics import Metrics
from slm.server.schemas import (
    CompletionRequest,
    DetokenizeRequest,
    PredictRequest,
    PredictResponse,
    TokenizeRequest,
)
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

    def __init__(self, s: Served, prompt_tokens: int, started: float | None = None) -> None:
        self.id, self.created, self.model = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), s.model_id()
        self.prompt_tokens, self.started = prompt_tokens, started or time.perf_counter()

    def response(self, choices: list[dict], completion_tokens: int) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices,
                "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": self.prompt_tokens + completion_tokens},
                "timing": timing(self.started, completion_tokens)}

    def chunk(self, text: str, finish: str | None) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [choice(0, text, finish)]}


def choice(index: int, text: str, finish: str | None, logprobs: dict | None = None) -> dict:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}


def finish_reason(seq: SequenceState | None) -> str:
    return "length" if seq is None or seq.finish_reason == "length" else "stop"


def prompt_ids(s: Served, prompt: str | list[int], field: str) -> list[int]:
    if isinstance(prompt, str):
        return encode_prompt(s, prompt, field)
    vocab = running_engine(s).tokenizer.vocab_size
    bad = next((t for t in prompt if not 0 <= t < vocab), None)
    if bad is not None:
        raise HTTPException(422, f"{field}: token id {bad} is outside the vocabulary (0..{vocab - 1})")
    return list(prompt)


def logprobs_object(tokenizer, ids: list[int], scores: TokenScores, first: int) -> dict:
    """OpenAI's logprobs for ``ids[first:]``: tokens, their log-probabilities (None for the very first token,
    which nothing predicts), the top alternatives plus the chosen token, and character offsets into the
    returned text (which starts at ``ids[first]``)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    decoder, offset = tokenizer.stream_decoder(), 0
    for j in range(first, len(ids)):
        out["tokens"].append(tokenizer.decode([ids[j]]))
        out["text_offset"].append(offset)
        offset += len(decoder.push(ids[j]))
        chosen = scores.logprobs[j - 1] if j > 0 else None  # logprobs[j - 1] is the log-probability of ids[j]
        out["token_logprobs"].append(chosen)
        out["top_logprobs"].append(None if j == 0 else top_alternatives(tokenizer, scores, j, ids[j]))
    return out


def top_alternatives(tokenizer, scores: TokenScores, j: int, token: int) -> dict[str, float]:
    top: dict[str, float] = {}
    if scores.top_ids:
        for t, lp in zip(scores.top_ids[j - 1], scores.top_logprobs[j - 1], strict=True):
            top.setdefault(tokenizer.decode([t]), lp)  # two ids may decode alike (parts of one character)
    top.setdefault(tokenizer.decode([token]), scores.logprobs[j - 1])  # OpenAI: the chosen token is always there
    return top


async def complete_one(s: Served, index: int, prompt: str | list[int], ids: list[int], body: CompletionRequest,
                       params: SamplingParams | None, http: Request) -> tuple[dict, int, int]:
    """One prompt's choice, with its prompt and completion token counts."""
    seq = await run_to_end(s, submit(s, "cached", ids, params), http) if params else None
    generated = seq.generated if seq else []
    text = seq.text if seq else ""
    logprobs = None
    if body.logprobs is not None:
        everything = ids + generated
        try:
            scores = await running_engine(s).score(everything, body.logprobs)
        except QueueFull as e:
            raise HTTPException(429, str(e)) from e
        logprobs = logprobs_object(running_engine(s).tokenizer, everything, scores, 0 if body.echo else len(ids))
    if body.echo:
        text = (prompt if isinstance(prompt, str) else running_engine(s).tokenizer.decode(ids)) + text
    return choice(index, text, finish_reason(seq), logprobs), len(ids), len(generated)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, http: Request, s: Served = Depends(served)):
    params = None
    if body.max_tokens > 0:
        params = sampling_params(s, body.max_tokens, body.temperature, body.top_k, body.top_p, body.seed,
                                 body.stop, body.ignore_eos, body.controls())
    prompts = body.prompts()
    if body.stream:
        return stream_completion(s, body, prompts[0], params, http)
    started = time.perf_counter()
    # Every prompt is checked before any is submitted, so a bad one costs no generation.
    fields = ["prompt"] if isinstance(body.prompt, str) else [f"prompt[{i}]" for i in range(len(prompts))]
    ids = [prompt_ids(s, p, f) for p, f in zip(prompts, fields, strict=True)]
    results = await asyncio.gather(*(complete_one(s, i, p, ids[i], body, params, http)
                                     for i, p in enumerate(prompts)))
    completion = Completion(s, sum(r[1] for r in results), started)
    n = sum(r[2] for r in results)
    s.metrics.generated("cached", "/v1/completions", n, time.perf_counter() - started)
    return completion.response([r[0] for r in results], n)


def stream_completion(s: Served, body: CompletionRequest, prompt: str | list[int], params: SamplingParams | None,
                      http: Request) -> StreamingResponse:
    ids = prompt_ids(s, prompt, "prompt")
    completion = Completion(s, len(ids))
    req = submit(s, "cached", ids, params, stream=True) if params else None

    async def sse() -> AsyncIterator[str]:
        if body.echo:
            echoed = prompt if isinstance(prompt, str) else running_engine(s).tokenizer.decode(ids)
            yield f"data: {json.dumps(completion.chunk(echoed, None))}\n\n"
        if req is None:
            yield f"data: {json.dumps(completion.response([choice(0, '', 'length')], 0))}\n\n"
        else:
            async for kind, payload in events(s, req, http):
                if kind == "text":
                    yield f"data: {json.dumps(completion.chunk(payload, None))}\n\n"
                elif kind == "error":
                    yield f"data: {json.dumps({'error': {'message': str(payload)}})}\n\n"
                    return
                elif kind == "done" and payload is not None:
                    n = len(payload.generated)
                    s.metrics.generated("cached", "/v1/completions", n, time.perf_counter() - completion.started)
                    yield f"data: {json.dumps(completion.response([choice(0, '', finish_reason(payload))], n))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, s: Served = Depends(served)):
    """vLLM's /tokenize (lm-evaluation-harness uses it to tokenize with the server's own tokenizer)."""
    tokens = running_engine(s).tokenizer.encode(body.prompt)
    return {"count": len(tokens), "max_model_len": running_engine(s).context_length, "tokens": tokens}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, s: Served = Depends(served)):
    tokenizer = running_engine(s).tokenizer
    prompt_ids(s, body.tokens, "tokens")
    return {"prompt": tokenizer.decode(body.tokens)}


@router.get("/tokenizer_info")
async def tokenizer_info(s: Served = Depends(served)):
    engine = running_engine(s)
    eot = engine.tokenizer.decode([engine.tokenizer.eot_id]) if engine.tokenizer.eot_id is not None else None
    return {"tokenizer_class": "byte-level BPE", "kind": engine.tokenizer.kind, "vocab_size":
            engine.tokenizer.vocab_size, "eos_token": eot, "bos_token": None, "pad_token": None,
            "model_max_length": engine.context_length}


@router.get("/v1/models")
async def models(s: Served = Depends(served)):
    return {"object": "list", "data": [{"id": s.model_id(), "object": "model", "created": 0, "owned_by": "slm"}]}


@router.get("/metrics")
async def prometheus(s: Served = Depends(served)):
    if s.engine is not None:
        s.metrics.queue(s.engine.queue_depth)
    return Response(generate_latest(s.metrics.registry), media_type=CONTENT_TYPE_LATEST)
