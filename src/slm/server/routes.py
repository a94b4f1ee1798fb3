"""The endpoints: /, /health, /predict, /v1/completions (with SSE streaming), /tokenize, /detokenize,
/tokenizer_info, /v1/models, /metrics.

Each endpoint reads on its own; what they share (the engine, settings, metrics) comes from the
``served`` dependency, and the request plumbing (prompt checks, submit, wait, cancel) from small functions.
One module of ~460 lines because it is the API's whole surface: nine endpoints over the same plumbing.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import get_args

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import slm
from slm.evaluate import TokenScores
from slm.generation import SamplingParams, SequenceState
from slm.instruct import header
from slm.server.engine import EngineFailure, Failure, GenerationRequest, QueueFull, ScoreJob, ServingEngine
from slm.server.guard import RETRY_AFTER_SECONDS
from slm.server.metrics import Metrics
from slm.server.schemas import (
    COMPLETIONS_VARIANT,
    CompletionRequest,
    DetokenizeRequest,
    ErrorResponse,
    ModelType,
    PredictRequest,
    PredictResponse,
    StoryFields,
    TokenizeRequest,
)
from slm.server.settings import Settings

ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in {
    401: "missing or wrong API key (when the server has one)",
    408: "the body took too long to arrive",
    413: "the body is over the size limit",
    422: "a field that cannot be used; `errors` names it",
    429: "the queue is full: retry after `Retry-After` seconds",
    499: "the client closed the request",
    500: "the engine failed on this request (the server carries on)",
    503: "the model is not loaded, or the server is at its connection limit",
    504: "the request took longer than the request timeout",
}.items()}
router = APIRouter(responses=ERRORS)
TOKENIZE_OFF_LOOP_CHARS = 2_000  # longer texts are tokenized in a thread, so the event loop keeps serving


class FieldProblem(Exception):
    """A field the model or the server's limits cannot take (422 naming it)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@dataclass
class ServerState:
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


def served(request: Request) -> ServerState:
    return request.app.state.served


def running_engine(s: ServerState) -> ServingEngine:
    if not s.running:
        raise HTTPException(503, "the model is not loaded or the engine is not running")
    return s.engine


# ---- request plumbing -----------------------------------------------------------------------------------
def sampling_params(s: ServerState, field: str, max_new: int, temperature: float, top_k, top_p, seed, stop=(),
                    ignore_eos: bool = False, controls: dict | None = None) -> SamplingParams:
    if max_new > s.settings.max_new_tokens:
        raise FieldProblem(field, f"at most {s.settings.max_new_tokens}, got {max_new}")
    return SamplingParams(max_new_tokens=max_new, temperature=temperature, top_k=top_k or None, top_p=top_p,
                          seed=seed, stop=tuple(stop or ()), stop_at_eot=not ignore_eos, **(controls or {}))


async def encode_prompt(s: ServerState, text: str, field: str) -> list[int]:
    if len(text) > s.settings.max_prompt_chars:
        raise FieldProblem(field, f"at most {s.settings.max_prompt_chars} characters, got {len(text)}")
    ids = await encode(running_engine(s), text)
    if not ids:
        raise FieldProblem(field, "the prompt encodes to no tokens")
    return ids


async def encode(engine: ServingEngine, text: str) -> list[int]:
    if len(text) > TOKENIZE_OFF_LOOP_CHARS:
        return await asyncio.to_thread(engine.tokenizer.encode, text)
    return engine.tokenizer.encode(text)


def story_header(s: ServerState, body: StoryFields) -> str:
    """The header that asks for the request's words and features ("" when it has none); a 422 when the model
    was never trained on the format (its config.json has no template)."""
    if not (body.words or body.features):
        return ""
    if not (s.info or {}).get("template"):
        raise FieldProblem("words" if body.words else "features",
                           f"the model {s.model_id()} was not trained to follow requests (no template in its "
                           "config.json); train or fine-tune one on `slm prepare --instruct` data")
    return header(body.story_request())


def check_prompt_tokens(s: ServerState, ids: list[list[int]]) -> None:
    """The request's prompts together: their tokens bound the prefill and scoring work it can ask for."""
    total = sum(map(len, ids))
    if total > s.settings.max_prompt_tokens:
        raise FieldProblem("prompt", f"at most {s.settings.max_prompt_tokens} tokens in all, got {total}")


def too_busy(e: QueueFull) -> HTTPException:
    return HTTPException(429, str(e), headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def submit(s: ServerState, variant: str, ids: list[int], params: SamplingParams, deadline: float,
           stream: bool = False) -> GenerationRequest:
    req = GenerationRequest(variant, ids, params, asyncio.get_running_loop(), deadline=deadline, wants_text=stream)
    try:
        running_engine(s).submit(req)
    except QueueFull as e:
        raise too_busy(e) from e
    return req


def deadline(s: ServerState) -> float:
    """When the request must be done: generation and scoring count against one timeout."""
    return time.perf_counter() + s.settings.request_timeout


def timed_out(s: ServerState) -> HTTPException:
    return HTTPException(504, f"the request took longer than the request timeout ({s.settings.request_timeout:g} s)")


async def events(s: ServerState, req: GenerationRequest, http: Request) -> AsyncIterator[tuple[str, object]]:
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
                s.engine.ensure_worker()  # a worker that died is restarted, and fails this request if it held it
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


async def run_to_end(s: ServerState, req: GenerationRequest, http: Request) -> SequenceState:
    seq = None
    async for kind, payload in events(s, req, http):
        if kind == "error":
            raise HTTPException(payload.status, payload.message)
        if kind == "done":
            seq = payload
    if seq is None or seq.finish_reason == "cancelled":
        raise HTTPException(499, "client closed the request")
    if seq.finish_reason == "timeout":
        raise timed_out(s)
    return seq


async def scores_of(s: ServerState, ids: list[int], top_n: int, until: float, http: Request) -> TokenScores:
    """Score ``ids`` on the engine's worker; a client that goes away cancels the job."""
    try:
        job: ScoreJob = running_engine(s).score(ids, top_n, until)
    except QueueFull as e:
        raise too_busy(e) from e
    try:
        while True:
            done, _ = await asyncio.wait({job.future}, timeout=0.5)
            if done:
                return job.future.result()
            if await http.is_disconnected():
                raise HTTPException(499, "client closed the request")
    except TimeoutError as e:
        raise timed_out(s) from e
    except EngineFailure as e:
        raise HTTPException(500, str(e)) from e
    finally:
        if not job.future.done():
            running_engine(s).cancel(job)


def timing(started: float, n: int) -> dict:
    """Measured in the server, as /predict's "time" is, so clients compare like with like."""
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 4), "tokens_per_second": round(n / seconds, 2) if seconds else 0.0}


# ---- endpoints ------------------------------------------------------------------------------------------
@router.get("/")
async def root(s: ServerState = Depends(served)):
    return {"name": "slm", "version": slm.__version__, "device": "cpu", "model": s.info,
            "model_types": list(get_args(ModelType)), "docs": "/docs"}


@router.get("/health")
async def health(s: ServerState = Depends(served)):
    if not s.running:
        return JSONResponse({"status": "unavailable", "detail": "the model is not loaded or the engine is not running",
                             "errors": []}, status_code=503)
    return {"status": "ok", "model": s.model_id(), "queue_depth": s.engine.queue_depth,
            "engine_restarts": s.engine.restarts, "last_engine_error": s.engine.last_error}


@router.post("/predict", response_model=PredictResponse)
async def predict(body: PredictRequest, http: Request, s: ServerState = Depends(served)):
    until = deadline(s)
    params = sampling_params(s, "max_new_tokens", body.max_new_tokens, body.temperature, body.top_k, body.top_p,
                             body.seed, controls=body.controls() | body.guidance())
    prompt = story_header(s, body) + body.input_text
    ids = await encode_prompt(s, prompt, "input_text")
    started = time.perf_counter()
    seq = await run_to_end(s, submit(s, body.model_type, ids, params, until), http)
    seconds = time.perf_counter() - started
    n = len(seq.generated)
    s.metrics.generated(body.model_type, "/predict", n, seconds)
    return PredictResponse(
        result=seq.text, prompt=prompt, time=round(seconds, 4), model_type=body.model_type, prompt_tokens=len(ids),
        generated_tokens=n, tokens_per_second=round(n / seconds, 2) if seconds > 0 else 0.0,
        finish_reason=seq.finish_reason or "length", prompt_truncated_tokens=seq.prompt_truncated,
        settings={"max_new_tokens": body.max_new_tokens, "temperature": body.temperature, "top_k": body.top_k,
                  "top_p": body.top_p, "seed": body.seed, "kv_cache": body.model_type != "basic", **body.controls(),
                  **({"word_boost": body.word_boost} if body.words else {})},
    )


class Completion:
    """OpenAI's text_completion objects for one request."""

    def __init__(self, s: ServerState, prompt_tokens: int, started: float | None = None) -> None:
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


async def prompt_ids(s: ServerState, prompt: str | list[int], field: str, head: str = "") -> list[int]:
    """A prompt's token ids, after the ids of ``head`` (a story request's header) when there is one."""
    if isinstance(prompt, str):
        return await encode_prompt(s, head + prompt, field)
    head_ids = running_engine(s).tokenizer.encode(head) if head else []
    vocab = running_engine(s).tokenizer.vocab_size
    bad = next((t for t in prompt if not 0 <= t < vocab), None)
    if bad is not None:
        raise FieldProblem(field, f"token id {bad} is outside the vocabulary (0..{vocab - 1})")
    return head_ids + list(prompt)


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


def whole_prompt(s: ServerState, head: str, prompt: str | list[int], ids: list[int]) -> str:
    """The text the model continued (echo, and a story request's shown prompt): decoded only when asked for."""
    return head + prompt if isinstance(prompt, str) else running_engine(s).tokenizer.decode(ids)


async def complete_one(s: ServerState, index: int, prompt: str | list[int], ids: list[int], body: CompletionRequest,
                       params: SamplingParams | None, until: float, http: Request,
                       head: str = "") -> tuple[dict, int, int]:
    """One prompt's choice, with its prompt and completion token counts; with a story request's header,
    the choice shows the whole prompt the model was given."""
    seq = await run_to_end(s, submit(s, COMPLETIONS_VARIANT, ids, params, until), http) if params else None
    generated = seq.generated if seq else []
    text = seq.text if seq else ""
    logprobs = None
    if body.logprobs is not None:
        everything = ids + generated
        scores = await scores_of(s, everything, body.logprobs, until, http)
        logprobs = logprobs_object(running_engine(s).tokenizer, everything, scores, 0 if body.echo else len(ids))
    if body.echo:
        text = whole_prompt(s, head, prompt, ids) + text
    result = choice(index, text, finish_reason(seq), logprobs)
    if head:
        result["prompt"] = whole_prompt(s, head, prompt, ids)
    return result, len(ids), len(generated)


# One server-sent event (OpenAPI 3.0/3.1 put the per-event schema under `schema`; 3.2 calls it itemSchema).
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string", "description": "a JSON text_completion chunk, an error object, or [DONE]"},
    "event": {"type": "string"}, "id": {"type": "string"}}}


@router.post("/v1/completions", responses={200: {
    "description": "a text_completion object; with `stream: true`, server-sent events of its chunks",
    "content": {"application/json": {}, "text/event-stream": {"schema": SSE_EVENT}}}})
async def completions(body: CompletionRequest, http: Request, s: ServerState = Depends(served)):
    until = deadline(s)
    params = None
    if body.max_tokens > 0:
        params = sampling_params(s, "max_tokens", body.max_tokens, body.temperature, body.top_k, body.top_p,
                                 body.seed, body.stop, body.ignore_eos, body.controls() | body.guidance())
    prompts = body.prompts()
    # Every prompt is checked before any is submitted, so a bad one costs no generation.
    fields = ["prompt"] if len(prompts) == 1 else [f"prompt[{i}]" for i in range(len(prompts))]
    head = story_header(s, body)
    ids = [await prompt_ids(s, p, f, head) for p, f in zip(prompts, fields, strict=True)]
    check_prompt_tokens(s, ids)
    if body.stream:
        return stream_completion(s, body, prompts[0], ids[0], params, until, http, head)
    started = time.perf_counter()
    results = await asyncio.gather(*(complete_one(s, i, p, ids[i], body, params, until, http, head)
                                     for i, p in enumerate(prompts)))
    completion = Completion(s, sum(r[1] for r in results), started)
    n = sum(r[2] for r in results)
    s.metrics.generated(COMPLETIONS_VARIANT, "/v1/completions", n, time.perf_counter() - started)
    return completion.response([r[0] for r in results], n)


def stream_error(failure: Failure) -> str:
    """An error event, as OpenAI's API sends one mid-stream (its clients raise on it)."""
    return f"data: {json.dumps({'error': {'message': failure.message, 'code': failure.status}})}\n\n"


def stream_completion(s: ServerState, body: CompletionRequest, prompt: str | list[int], ids: list[int],
                      params: SamplingParams | None, until: float, http: Request, head: str = "") -> StreamingResponse:
    completion = Completion(s, len(ids))
    req = submit(s, COMPLETIONS_VARIANT, ids, params, until, stream=True) if params else None

    async def sse() -> AsyncIterator[str]:
        if head:  # the whole prompt the model continues, first, as a non-streamed choice carries it
            first = completion.chunk("", None)
            first["choices"][0]["prompt"] = whole_prompt(s, head, prompt, ids)
            yield f"data: {json.dumps(first)}\n\n"
        if body.echo:
            yield f"data: {json.dumps(completion.chunk(whole_prompt(s, head, prompt, ids), None))}\n\n"
        if req is None:
            yield f"data: {json.dumps(completion.response([choice(0, '', 'length')], 0))}\n\n"
        else:
            async for kind, payload in events(s, req, http):
                if kind == "text":
                    yield f"data: {json.dumps(completion.chunk(payload, None))}\n\n"
                elif kind == "error":
                    yield stream_error(payload)
                    break
                elif kind == "done" and payload is not None and payload.finish_reason == "timeout":
                    yield stream_error(Failure(504, timed_out(s).detail))  # cut short: not a normal end
                    break
                elif kind == "done" and payload is not None:
                    n = len(payload.generated)
                    seconds = time.perf_counter() - completion.started
                    s.metrics.generated(COMPLETIONS_VARIANT, "/v1/completions", n, seconds)
                    yield f"data: {json.dumps(completion.response([choice(0, '', finish_reason(payload))], n))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, s: ServerState = Depends(served)):
    """vLLM's /tokenize (lm-evaluation-harness uses it to tokenize with the server's own tokenizer)."""
    tokens = await encode(running_engine(s), body.prompt)
    return {"count": len(tokens), "max_model_len": running_engine(s).context_length, "tokens": tokens}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, s: ServerState = Depends(served)):
    tokenizer = running_engine(s).tokenizer
    await prompt_ids(s, body.tokens, "tokens")
    return {"prompt": tokenizer.decode(body.tokens)}


@router.get("/tokenizer_info")
async def tokenizer_info(s: ServerState = Depends(served)):
    engine = running_engine(s)
    eot = engine.tokenizer.decode([engine.tokenizer.eot_id]) if engine.tokenizer.eot_id is not None else None
    return {"tokenizer_class": "byte-level BPE", "kind": engine.tokenizer.kind, "vocab_size":
            engine.tokenizer.vocab_size, "eos_token": eot, "bos_token": None, "pad_token": None,
            "model_max_length": engine.context_length}


@router.get("/v1/models")
async def models(s: ServerState = Depends(served)):
    return {"object": "list", "data": [{"id": s.model_id(), "object": "model", "created": 0, "owned_by": "slm"}]}


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus(s: ServerState = Depends(served)):
    """Prometheus' text format."""
    if s.engine is not None:
        s.metrics.queue(s.engine.queue_depth)
    return PlainTextResponse(generate_latest(s.metrics.registry), media_type=CONTENT_TYPE_LATEST)
