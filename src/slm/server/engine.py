"""Serving engine: one worker thread batches all concurrent requests onto the models.

Requests wait in a bounded queue; at every decode step the worker moves waiting requests into free batch
slots (continuous batching: a request joins the running batch at the next step), steps each model that
has work, and hands each produced text piece to its request's asyncio queue. The event loop only ever
waits on those queues, so it never blocks on the model.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field

import torch

from slm.evaluate import TokenScores, score_token_logprobs
from slm.generation import Engine, SamplingParams, SequenceState
from slm.model import GPT
from slm.tokenizer import Tokenizer


class QueueFull(Exception):
    """The waiting queue is at its bound: the client should retry later (HTTP 429)."""


@dataclass
class Request:
    variant: str
    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    deadline: float = float("inf")
    cancelled: bool = False
    seq: SequenceState | None = None
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    wants_text: bool = True  # False: only the final "done" (a non-streamed response)

    def emit(self, kind: str, payload: object) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


@dataclass
class ScoreJob:
    """Log-probabilities of a token sequence (``logprobs``/``echo``), run on the worker between decode steps."""

    ids: list[int]
    top_n: int
    future: asyncio.Future


def deliver(events: list[tuple[Request, str, object]]) -> None:
    """Hand a decode step's events to their requests: one wake-up of each event loop per step, not one per
    request, which matters when the event loop and the model share a few cores."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Request, str, object]]] = {}
    for event in events:
        by_loop.setdefault(event[0].loop, []).append(event)
    for loop, batch in by_loop.items():
        loop.call_soon_threadsafe(_put_all, batch)


def _resolve(future: asyncio.Future, result: object) -> None:
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future, message: str) -> None:
    if not future.done():
        future.set_exception(RuntimeError(message))


def _put_all(batch: list[tuple[Request, str, object]]) -> None:
    for req, kind, payload in batch:
        req.events.put_nowait((kind, payload))


class ServingEngine:
    """Owns the models (one copy each) and the worker thread that decodes for every request."""

    def __init__(self, variants: dict[str, tuple[GPT, bool]], tokenizer: Tokenizer, max_batch: int = 16,
                 max_queue: int = 64, metrics=None) -> None:
        self.tokenizer = tokenizer
        self.engines = {name: Engine(model, tokenizer, max_batch=max_batch, use_cache=use_cache)
                        for name, (model, use_cache) in variants.items()}
        self.max_queue = max_queue
        self.metrics = metrics
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: dict[int, Request] = {}  # id(seq) -> request
        self._scoring: collections.deque[ScoreJob] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="slm-engine", daemon=True)
        self.error: BaseException | None = None

    # ---- called from the event loop ------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def context_length(self) -> int:
        return self.engines["cached"].model.config.context_length

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    def submit(self, request: Request) -> None:
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self._waiting.append(request)
            self._wake.notify()

    def score(self, ids: list[int], top_n: int = 0) -> asyncio.Future[TokenScores]:
        """Queue a scoring pass on the trained model; await the returned future for its TokenScores."""
        job = ScoreJob(ids, top_n, asyncio.get_running_loop().create_future())
        with self._wake:
            if len(self._scoring) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} scoring requests waiting); retry later")
            self._scoring.append(job)
            self._wake.notify()
        return job.future

    def cancel(self, request: Request) -> None:
        request.cancelled = True  # the worker drops it before its next step
        with self._wake:
            self._wake.notify()

    # ---- the worker thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._wake:
                        while not self._stop and not self._waiting and not self._running and not self._scoring:
                            self._wake.wait()
                        if self._stop:
                            return
                        self._admit()
                        job = self._scoring.popleft() if self._scoring else None
                    if job is not None:  # one scoring pass per round, so decoding keeps flowing
                        self._score(job)
                    self._reap()
                    for name, engine in self.engines.items():
                        if engine.active:
                            self._step(name, engine)
        except BaseException as e:  # surface through /health rather than dying silently
            self.error = e
            for req in list(self._running.values()) + list(self._waiting):
                req.emit("error", "the generation engine failed; see the server log")
            for job in self._scoring:
                job.future.get_loop().call_soon_threadsafe(_fail, job.future, "the generation engine failed")
            raise

    def _score(self, job: ScoreJob) -> None:
        if job.future.cancelled():
            return
        try:
            result = score_token_logprobs(self.engines["cached"].model, job.ids, job.top_n)
        except ValueError as e:
            job.future.get_loop().call_soon_threadsafe(_fail, job.future, str(e))
            return
        job.future.get_loop().call_soon_threadsafe(_resolve, job.future, result)

    def _admit(self) -> None:
        """Move waiting requests into free batch slots (called with the lock held)."""
        keep: collections.deque[Request] = collections.deque()
        while self._waiting:
            req = self._waiting.popleft()
            engine = self.engines[req.variant]
            if req.cancelled:
                req.emit("done", None)
                continue
            if engine.free_slots <= 0:
                keep.append(req)
                continue
            try:
                req.seq = engine.add(req.prompt, req.params)
            except ValueError as e:
                req.emit("error", str(e))
                continue
            req.started = time.perf_counter()
            self._running[id(req.seq)] = req
        self._waiting = keep

    def _reap(self) -> None:
        """Drop cancelled and timed-out requests from their batches."""
        now = time.perf_counter()
        for key, req in list(self._running.items()):
            if req.cancelled or now > req.deadline:
                reason = "cancelled" if req.cancelled else "timeout"
                self.engines[req.variant].cancel(req.seq)
                req.seq.finish_reason = reason
                del self._running[key]
                if self.metrics:
                    self.metrics.finished(reason)
                req.emit("done", req.seq)

    def _step(self, name: str, engine: Engine) -> None:
        if self.metrics:
            self.metrics.batch(name, len(engine.active))
        events: list[tuple[Request, str, object]] = []
        for seq, _token in engine.step():
            req = self._running.get(id(seq))
            if req is None:
                continue
            piece = seq.take_text()
            if piece and req.wants_text:
                events.append((req, "text", piece))
            if seq.finished:
                del self._running[id(seq)]
                if self.metrics:
                    self.metrics.finished(seq.finish_reason)
                events.append((req, "done", seq))
        deliver(events)
        if self.metrics:
            self.metrics.queue(len(self._waiting))
