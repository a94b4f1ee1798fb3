"""The FastAPI app: settings, start-up (load the model, start the engine), middleware and error handlers.

The endpoints themselves are in routes.py, the metrics in metrics.py.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

import slm
from slm.checkpoint import CheckpointError, load, resolve, template
from slm.config import ConfigError
from slm.generation import Engine, GenerationError
from slm.memory import return_large_buffers_to_the_system
from slm.model import GPT
from slm.server.connections import uvicorn_config
from slm.server.engine import ServingEngine
from slm.server.guard import Guard
from slm.server.metrics import Metrics
from slm.server.routes import FieldProblem, ServerState, router
from slm.server.schemas import COMPLETIONS_VARIANT
from slm.server.settings import Settings

log = logging.getLogger("slm.server")


def build_engine(settings: Settings, metrics: Metrics) -> tuple[ServingEngine, dict]:
    if settings.threads:
        torch.set_num_threads(settings.threads)
    model, tokenizer = load(settings.model)
    torch.manual_seed(0)
    untrained = GPT(model.config).eval()  # same shape, random initialisation
    # schemas.ModelType: the trained model with its cache (what /v1/completions serves), without it, and untrained
    variants = {COMPLETIONS_VARIANT: (model, True), "basic": (model, False), "untrained": (untrained, True)}
    engines = {name: Engine(net, tokenizer, max_batch=settings.max_batch, use_cache=use_cache)
               for name, (net, use_cache) in variants.items()}
    engine = ServingEngine(engines, tokenizer, max_queue=settings.max_queue, metrics=metrics,
                           scorer=COMPLETIONS_VARIANT)
    native = engine.engines[COMPLETIONS_VARIANT].native is not None
    info = {"name": resolve(settings.model).name, "parameters": model.num_parameters(),  # no path: GET / is open
            "config": model.config.to_dict(), "tokenizer": tokenizer.kind, "template": template(settings.model),
            "native_decode": native}
    return engine, info


async def build_engine_in_passing_thread(settings: Settings, metrics: Metrics) -> tuple[ServingEngine, dict]:
    """build_engine in a thread that ends with it, so torch's OpenMP threads of the loading end too. Kept alive
    (as asyncio.to_thread's are), they would outnumber the cores beside the engine's worker, and libgomp then
    stops spinning between parallel regions, and every decode step is slower (docs/decode-speed.md)."""
    with ThreadPoolExecutor(max_workers=1) as loader:
        return await asyncio.get_running_loop().run_in_executor(loader, build_engine, settings, metrics)


def validation_errors(exc: RequestValidationError) -> list[dict]:
    """One {field, message} per problem; a body that is not JSON is reported as `body` with the position."""
    errors = []
    for e in exc.errors():
        if e.get("type") == "json_invalid":
            position = e["loc"][1] if len(e["loc"]) > 1 else "?"
            reason = (e.get("ctx") or {}).get("error", "")
            errors.append({"field": "body", "message": f"invalid JSON at position {position}: {reason}".rstrip(": ")})
        else:
            errors.append({"field": ".".join(str(x) for x in e["loc"] if x != "body"), "message": e["msg"]})
    return errors


def body_error(exc: StarletteHTTPException) -> dict | None:
    """What was wrong with a body FastAPI could not parse (it only says "error parsing the body")."""
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return {"field": "body", "message": f"not valid UTF-8 (byte {cause.start}): send JSON in UTF-8"}
    if isinstance(cause, RecursionError):
        return {"field": "body", "message": "JSON nested too deeply"}
    return None


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    served = ServerState(settings, Metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        served.engine, served.info = await build_engine_in_passing_thread(settings, served.metrics)
        served.engine.start()
        log.info("serving %s (%s parameters); decode step: %s", resolve(settings.model),
                 f"{served.info['parameters']:,}",
                 "native (C)" if served.info["native_decode"] else "PyTorch")
        yield
        served.engine.stop()

    app = FastAPI(title="slm", version=slm.__version__, lifespan=lifespan,
                  description="A small language model: generation with and without a KV cache.")
    app.state.settings, app.state.served = settings, served
    app.include_router(router)
    static_paths = {getattr(route, "path", None) for route in [*router.routes, *app.routes]} - {None}

    def count(scope: Scope, status: int) -> None:
        route = scope.get("route")  # set by routing; a request refused before it has its path
        path = route.path if route is not None else scope["path"]
        served.metrics.request(path if path in static_paths else None, status)

    # Added first, so it runs inside CORS: a browser's preflight needs no API key.
    app.state.count = count
    app.add_middleware(Guard, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes,
                       body_timeout=settings.body_timeout, count=count)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=[o.strip() for o in settings.cors_origins.split(",")],
                           allow_methods=["GET", "POST"], allow_headers=["*"])

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = validation_errors(exc)
        text = "; ".join(f"{e['field'] or 'body'}: {e['message']}" for e in errors)
        return JSONResponse({"detail": text, "errors": errors}, status_code=422)

    @app.exception_handler(FieldProblem)
    async def field_problem(request: Request, exc: FieldProblem):
        return JSONResponse({"detail": str(exc), "errors": [{"field": exc.field, "message": exc.message}]},
                            status_code=422)

    @app.exception_handler(GenerationError)
    async def generation_error(request: Request, exc: GenerationError):
        return JSONResponse({"detail": str(exc), "errors": []}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        problem = body_error(exc) if exc.status_code == 400 else None
        if problem is not None:
            return JSONResponse({"detail": f"body: {problem['message']}", "errors": [problem]}, status_code=422)
        return JSONResponse({"detail": str(exc.detail), "errors": []}, status_code=exc.status_code,
                            headers=exc.headers)

    return app


def check_address(host: str, port: int) -> None:
    """Refuse, in one line, an address the server could not listen on (taken, or not ours to take), before the
    model loads: uvicorn would say it in a log line after the start-up."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host}: not an address of this machine ({e.strerror})") from e
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port, or stop "
                              "what listens there") from e


def run_server(model: str | None = None, host: str | None = None, port: int | None = None) -> None:
    import uvicorn

    settings = Settings.from_env(model=model, host=host, port=port)
    path = resolve(settings.model)
    if not Path(path).is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    check_address(settings.host, settings.port)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return_large_buffers_to_the_system()
    uvicorn.Server(uvicorn_config(create_app(settings), settings)).run()
