"""The FastAPI app: /, /health, /predict, /v1/completions (with SSE streaming), /v1/models, /metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

import slm
from slm.checkpoint import load, resolve
from slm.generation import GenerationError, SamplingParams
from slm.model import GPT
from slm.server.engine import QueueFull, ServingEngine
from slm.server.engine import Request as GenRequest
from slm.server.guard import Guard
from slm.server.schemas import CompletionRequest, PredictRequest, PredictResponse
from slm.server.settings import Settings

log = logging.getLogger("slm.server")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("slm_requests_total", "HTTP requests", ["endpoint", "status"], registry=r)
        self.tokens = Counter("slm_generated_tokens_total", "tokens generated", ["model_type"], registry=r)
        self.latency = Histogram("slm_request_latency_seconds", "generation request latency", ["endpoint"],
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=r)
        self.queue_depth = Gauge("slm_queue_depth", "requests waiting for a batch slot", registry=r)
        self.batch_size = Gauge("slm_batch_size", "sequences in the last decode step", ["model_type"], registry=r)
        self.finish = Counter("slm_finished_total", "finished generations by reason", ["reason"], registry=r)

    def batch(self, name: str, n: int) -> None:
        self.batch_size.labels(name).set(n)

    def queue(self, n: int) -> None:
        self.queue_depth.set(n)

    def finished(self, reason: str | None) -> None:
        self.finish.labels(reason or "unknown").inc()


def build_engine(settings: Settings, metrics: Metrics) -> tuple[ServingEngine, dict]:
    if settings.threads:
        torch.set_num_threads(settings.threads)
    model, tokenizer = load(settings.model)
    torch.manual_seed(0)
    untrained = GPT(model.config).eval()  # same shape, random GPT-2 initialisation
    engine = ServingEngine({"cached": (model, True), "basic": (model, False), "untrained": (untrained, True)},
                           tokenizer, max_batch=settings.max_batch, max_queue=settings.max_queue, metrics=metrics)
    path = resolve(settings.model)
    info = {"name": path.name, "path": str(path), "parameters": model.num_parameters(),
            "config": model.config.to_dict(), "tokenizer": tokenizer.kind}
    return engine, info


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    metrics = Metrics()
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine, info = await asyncio.to_thread(build_engine, settings, metrics)
        engine.start()
        state.update(engine=engine, info=info)
        log.info("serving %s (%s parameters)", info["path"], f"{info['parameters']:,}")
        yield
        engine.stop()

    app = FastAPI(title="slm", version=slm.__version__, lifespan=lifespan,
                  description="A small GPT-2-style language model: generation with and without a KV cache.")

    # Added first, so it runs inside CORS: a browser's preflight needs no API key.
    app.add_middleware(Guard, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes,
                       count=lambda path, status: metrics.requests.labels(path, str(status)).inc())

    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=[o.strip() for o in settings.cors_origins.split(",")],
                           allow_methods=["GET", "POST"], allow_headers=["*"])

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = [{"field": ".".join(str(x) for x in e["loc"] if x != "body"), "message": e["msg"]}
                  for e in exc.errors()]
        text = "; ".join(f"{e['field'] or 'body'}: {e['message']}" for e in errors)
        return JSONResponse({"detail": text, "errors": errors}, status_code=422)

    @app.exception_handler(GenerationError)
    async def generation_error(request: Request, exc: GenerationError):
        return JSONResponse({"detail": str(exc)}, status_code=422)

    def engine() -> ServingEngine:
        if "engine" not in state or not state["engine"].alive:
            raise HTTPException(503, "the model is not loaded or the engine is not running")
        return state["engine"]

    def params_for(max_new: int, temperature: float, top_k, top_p, seed, stop=(), ignore_eos=False,
                   controls: dict | None = None) -> SamplingParams:
        if max_new > settings.max_new_tokens:
            raise HTTPException(422, f"max_new_tokens/max_tokens: at most {settings.max_new_tokens}, got {max_new}")
        return SamplingParams(max_new, temperature, top_k or None, top_p, seed, tuple(stop or ()),
                              stop_at_eot=not ignore_eos, **(controls or {}))

    def encode_prompt(text: str, field: str) -> list[int]:
        if len(text) > settings.max_prompt_chars:
            raise HTTPException(422, f"{field}: at most {settings.max_prompt_chars} characters, got {len(text)}")
        ids = engine().tokenizer.encode(text)
        if not ids:
            raise HTTPException(422, f"{field}: the prompt encodes to no tokens")
        return ids

    async def submit(variant: str, ids: list[int], params: SamplingParams, stream: bool = False) -> GenRequest:
        req = GenRequest(variant, ids, params, asyncio.get_running_loop(),
                         deadline=time.perf_counter() + settings.request_timeout, wants_text=stream)
        try:
            engine().submit(req)
        except QueueFull as e:
            raise HTTPException(429, str(e)) from e
        return req

    async def events(req: GenRequest, http: Request) -> AsyncIterator[tuple[str, object]]:
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
                        engine().cancel(req)
                        return
                if event is None:
                    continue
                kind, payload = event
                yield kind, payload
                if kind in ("done", "error"):
                    return
        finally:
            if not req.cancelled and (req.seq is None or not req.seq.finished):
                engine().cancel(req)

    async def run_to_end(req: GenRequest, http: Request):
        seq = None
        async for kind, payload in events(req, http):
            if kind == "error":
                raise HTTPException(500, str(payload))
            if kind == "done":
                seq = payload
        if seq is None or seq.finish_reason == "cancelled":
            raise HTTPException(499, "client closed the request")
        if seq.finish_reason == "timeout":
            raise HTTPException(504, f"generation took longer than the request timeout ({settings.request_timeout} s)")
        return seq

    # ---- endpoints -----------------------------------------------------------------------------------
    @app.get("/")
    async def root():
        return {"name": "slm", "version": slm.__version__, "device": "cpu", "model": state.get("info"),
                "model_types": ["untrained", "basic", "cached"], "docs": "/docs"}

    @app.get("/health")
    async def health():
        if "engine" not in state or not state["engine"].alive:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok", "model": state["info"]["name"], "queue_depth": state["engine"].queue_depth}

    @app.post("/predict", response_model=PredictResponse)
    async def predict(body: PredictRequest, http: Request):
        params = params_for(body.max_new_tokens, body.temperature, body.top_k, body.top_p, body.seed,
                            controls=body.controls())
        ids = encode_prompt(body.input_text, "input_text")
        started = time.perf_counter()
        req = await submit(body.model_type, ids, params)
        seq = await run_to_end(req, http)
        seconds = time.perf_counter() - started
        n = len(seq.generated)
        metrics.tokens.labels(body.model_type).inc(n)
        metrics.latency.labels("/predict").observe(seconds)
        return PredictResponse(
            result=seq.text, time=round(seconds, 4), model_type=body.model_type, prompt_tokens=len(ids),
            generated_tokens=n, tokens_per_second=round(n / seconds, 2) if seconds > 0 else 0.0,
            finish_reason=seq.finish_reason or "length", prompt_truncated_tokens=seq.prompt_truncated,
            settings={"max_new_tokens": body.max_new_tokens, "temperature": body.temperature, "top_k": body.top_k,
                      "top_p": body.top_p, "seed": body.seed, "kv_cache": body.model_type != "basic",
                      **body.controls()},
        )

    def model_id() -> str:
        return state["info"]["name"] if "info" in state else "slm"

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        params = params_for(body.max_tokens, body.temperature, body.top_k, body.top_p, body.seed, body.stop,
                            body.ignore_eos, body.controls())
        ids = encode_prompt(body.prompt, "prompt")
        started = time.perf_counter()
        req = await submit("cached", ids, params, stream=body.stream)
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(text: str, finish: str | None) -> dict:
            return {"id": cid, "object": "text_completion", "created": created, "model": model_id(),
                    "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

        def openai_reason(seq) -> str:
            return "length" if seq.finish_reason == "length" else "stop"

        def timing(n: int) -> dict:
            """Measured in the server, as /predict's "time" is, so clients compare like with like."""
            seconds = time.perf_counter() - started
            return {"seconds": round(seconds, 4), "tokens_per_second": round(n / seconds, 2) if seconds else 0.0}

        if body.stream:
            async def sse() -> AsyncIterator[str]:
                async for kind, payload in events(req, http):
                    if kind == "text":
                        yield f"data: {json.dumps(chunk(payload, None))}\n\n"
                    elif kind == "error":
                        yield f"data: {json.dumps({'error': {'message': str(payload)}})}\n\n"
                        return
                    elif kind == "done" and payload is not None:
                        metrics.tokens.labels("cached").inc(len(payload.generated))
                        metrics.latency.labels("/v1/completions").observe(time.perf_counter() - started)
                        final = chunk("", openai_reason(payload))
                        n = len(payload.generated)
                        final["usage"] = {"prompt_tokens": len(ids), "completion_tokens": n,
                                          "total_tokens": len(ids) + n}
                        final["timing"] = timing(n)
                        yield f"data: {json.dumps(final)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        seq = await run_to_end(req, http)
        n = len(seq.generated)
        metrics.tokens.labels("cached").inc(n)
        metrics.latency.labels("/v1/completions").observe(time.perf_counter() - started)
        out = chunk(seq.text, openai_reason(seq))
        out["usage"] = {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}
        out["timing"] = timing(n)
        return out

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id(), "object": "model", "created": 0, "owned_by": "slm"}]}

    @app.get("/metrics")
    async def prometheus():
        if "engine" in state:
            metrics.queue_depth.set(state["engine"].queue_depth)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.state.settings = settings
    return app


def run_server(model: str | None = None, host: str | None = None, port: int | None = None) -> None:
    import uvicorn

    settings = Settings.from_env(model=model, host=host, port=port)
    path = resolve(settings.model)
    if not Path(path).is_dir():
        raise ValueError(f"checkpoint directory not found: {path}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
