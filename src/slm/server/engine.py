"""Serving engine: one worker thread batches all concurrent requests onto the models.

Requests wait in a bounded queue; at every decode step the worker moves waiting requests into free batch
slots (continuous batching: a request joins the running batch at the next step), steps each model that
has work, and hands each produced text piece to its request's asyncio queue. The event loop only ever
waits on those queues, so it never blocks on the model.

The variants (the served model with its KV cache, the same model without it, an untrained copy: each an
Engine with its own batch) share the worker by time, not by turns: each round steps the variant that has had
the least worker time. A variant without the cache re-reads every sequence whole at each step, so its steps
grow with its sequences; stepping it every round would slow every cached request to its pace. By time, each
busy variant gets an equal share of the worker, whatever its step costs.

Scoring jobs (``logprobs``/``echo``) run on the same worker, one batch of windows per round, so a long
text shares the worker with decoding instead of holding it, and stops at its deadline or when its client
goes away.

Failures stay with their requests: a sampling error ends its own sequence, a failed forward pass fails the
requests of that batch, and anything else fails what was in flight; each is answered with a 500 that
names the request (the traceback goes to the log) and the worker carries on. A worker thread that died
anyway is restarted on the next look at it (``alive``, ``submit``), and /health reports the restarts.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from slm.evaluate import TokenScores, score_batches
from slm.generation import Engine, GenerationError, SamplingParams, SequenceState
from slm.model import GPT
from slm.tokenizer import Tokenizer

log = logging.getLogger("slm.server")


class QueueFull(Exception):
    """The waiting queue is at its bound: the client should retry later (HTTP 429)."""


@dataclass
class Failure:
    """Why the engine could not finish a request: the HTTP status and a message for the client."""

    status: int
    message: str


class EngineFailure(RuntimeError):
    """A scoring job that failed inside the engine (HTTP 500; the traceback is in the log)."""


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex[:16]}"


@dataclass
class GenerationRequest:
    variant: str
    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    id: str = field(default_factory=new_request_id)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    deadline: float = float("inf")  # time.perf_counter() value
    cancelled: bool = False
    seq: SequenceState | None = None
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    wants_text: bool = True  # False: only the final "done" (a non-streamed response)

    def emit(self, kind: str, payload: object) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


@dataclass
class ScoreJob:
    """Log-probabilities of a token sequence (``logprobs``/``echo``), computed a batch of windows per round."""

    ids: list[int]
    top_n: int
    future: asyncio.Future
    parts: Iterator[TokenScores]
    id: str = field(default_factory=new_request_id)
    deadline: float = float("inf")
    cancelled: bool = False
    scores: TokenScores = field(default_factory=lambda: TokenScores([], [], []))


def deliver(events: list[tuple[GenerationRequest, str, object]]) -> None:
    """Hand a decode step's events to their requests: one wake-up of each event loop per step, not one per
    request, which matters when the event loop and the model share a few cores."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[GenerationRequest, str, object]]] = {}
    for event in events:
        by_loop.setdefault(event[0].loop, []).append(event)
    for loop, batch in by_loop.items():
        loop.call_soon_threadsafe(_put_all, batch)


def _put_all(batch: list[tuple[GenerationRequest, str, object]]) -> None:
    for req, kind, payload in batch:
        req.events.put_nowait((kind, payload))


def _settle(future: asyncio.Future, result: object = None, error: BaseException | None = None) -> None:
    """Resolve a future from the worker thread (on its own loop; a future already cancelled stays so)."""
    def settle() -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)

    future.get_loop().call_soon_threadsafe(settle)


def engine_fault(request_id: str) -> Failure:
    return Failure(500, f"request {request_id} failed in the generation engine; the server log has the details "
                        "(the server carries on)")


class ServingEngine:
    """Owns the models (one copy each) and the worker thread that decodes for every request.

    ``engines``: variant name -> its decode Engine; ``scorer`` names the variant whose model scores texts
    (default: the first). One class of ~250 lines because the worker thread owns all of this state (the queue, the
    batches, the scoring jobs, its own restarts) and nothing else may touch it; each method is one step.
    """

    def __init__(self, engines: dict[str, Engine], tokenizer: Tokenizer, max_queue: int = 64, metrics=None,
                 scorer: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.engines = engines
        self.scorer: GPT = self.engines[scorer or next(iter(engines))].model
        self.worker_seconds = dict.fromkeys(engines, 0.0)  # decode time each variant has had (the fair share)
        self.max_queue = max_queue
        self.metrics = metrics
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._running: dict[int, GenerationRequest] = {}  # id(seq) -> request
        self._scoring: collections.deque[ScoreJob] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._started = self._stop = False
        self._thread = self._new_thread()
        self.restarts = 0  # times the worker failed and carried on, or died and was restarted
        self.last_error: str | None = None

    # ---- called from the event loop ------------------------------------------------------------------
    def start(self) -> None:
        self._started = True
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        self.ensure_worker()
        return self._thread.is_alive()

    @property
    def context_length(self) -> int:
        return self.scorer.config.context_length

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def full(self) -> bool:
        """Whether a new generation would be refused (read without the lock: a cheap early refusal)."""
        return len(self._waiting) >= self.max_queue

    def submit(self, request: GenerationRequest) -> None:
        self.ensure_worker()
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self._waiting.append(request)
            self._wake.notify()

    def score(self, ids: list[int], top_n: int = 0, deadline: float = float("inf")) -> ScoreJob:
        """Queue a scoring pass on the scoring model; await ``job.future`` for its TokenScores."""
        job = ScoreJob(ids, top_n, asyncio.get_running_loop().create_future(),
                       score_batches(self.scorer, ids, top_n, batch_size=1), deadline=deadline)
        self.ensure_worker()
        with self._wake:
            if len(self._scoring) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} scoring requests waiting); retry later")
            self._scoring.append(job)
            self._wake.notify()
        return job

    def cancel(self, request: GenerationRequest | ScoreJob) -> None:
        request.cancelled = True  # the worker drops it before its next step
        with self._wake:
            self._wake.notify()

    def ensure_worker(self) -> None:
        """Start a new worker if the last one died (``_run`` survives every Exception; this covers the rest)."""
        with self._wake:
            if not self._started or self._stop or self._thread.is_alive():
                return
            log.error("the engine's worker thread had stopped; restarting it")
            self.restarts += 1
            self._fail_in_flight()
            self._thread = self._new_thread()
            self._thread.start()

    # ---- the worker thread ---------------------------------------------------------------------------
    def _new_thread(self) -> threading.Thread:
        return threading.Thread(target=self._run, name="slm-engine", daemon=True)

    def _run(self) -> None:
        # OpenMP's thread count is per thread: the native step's parallel regions in this one follow torch's setting
        torch.set_num_threads(torch.get_num_threads())
        with torch.inference_mode():
            while True:
                try:
                    self._serve()
                    return
                except Exception as e:  # not one request's fault: fail what was in flight and carry on
                    log.exception("the generation engine failed; failing the requests in flight and carrying on")
                    self.last_error = f"{type(e).__name__}: {e}"
                    self.restarts += 1
                    with self._wake:
                        self._fail_in_flight()

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self._waiting and not self._running and not self._scoring:
                    self._wake.wait()
                if self._stop:
                    return
                self._admit()
                job = self._scoring.popleft() if self._scoring else None
            if job is not None and not self._score_step(job):  # one batch of windows per round
                with self._wake:
                    self._scoring.append(job)  # round robin between scoring jobs
            self._reap()
            name = self._next_variant()
            if name is not None:
                self._step(name, self.engines[name])

    def _next_variant(self) -> str | None:
        """The busy variant that has had the least worker time. An idle variant is brought up to the least busy
        one's time: idle time is not saved up to be spent later in one long run of its own steps."""
        busy = [name for name, engine in self.engines.items() if engine.active]
        if not busy:
            return None
        floor = min(self.worker_seconds[name] for name in busy)
        for name in self.engines.keys() - busy:
            self.worker_seconds[name] = max(self.worker_seconds[name], floor)
        return min(busy, key=self.worker_seconds.__getitem__)

    def _fail_in_flight(self) -> None:
        """Answer every running, waiting and scoring request with a 500 (called with the lock held)."""
        for req in [*self._running.values(), *self._waiting]:
            req.emit("error", engine_fault(req.id))
            self._finished("error")
        self._running.clear()
        self._waiting.clear()
        for engine in self.engines.values():
            engine.reset()
        for job in self._scoring:
            _settle(job.future, error=EngineFailure(engine_fault(job.id).message))
        self._scoring.clear()

    def _score_step(self, job: ScoreJob) -> bool:
        """Score the job's next batch of windows; True when the job is over (done, failed, late or cancelled)."""
        if job.cancelled or job.future.cancelled():
            return True
        if time.perf_counter() > job.deadline:
            _settle(job.future, error=TimeoutError("scoring took longer than the request timeout"))
            return True
        try:
            job.scores.extend(next(job.parts))
        except StopIteration:
            _settle(job.future, job.scores)
            return True
        except Exception as e:
            log.error("scoring request %s failed", job.id, exc_info=e)
            _settle(job.future, error=EngineFailure(engine_fault(job.id).message))
            return True
        return False

    def _admit(self) -> None:
        """Move waiting requests into free batch slots (called with the lock held)."""
        keep: collections.deque[GenerationRequest] = collections.deque()
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
            except GenerationError as e:
                req.emit("error", Failure(422, str(e)))
                continue
            except Exception as e:
                log.error("request %s could not join the batch", req.id, exc_info=e)
                req.emit("error", engine_fault(req.id))
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
                self._finished(reason)
                req.emit("done", req.seq)

    def _step(self, name: str, engine: Engine) -> None:
        if self.metrics:
            self.metrics.batch(name, len(engine.active))
        started = time.perf_counter()
        try:
            produced = engine.step()
        except Exception as e:  # the forward pass touched every row of this batch: fail those, keep the rest
            failed = [req for req in self._running.values() if req.variant == name]
            log.error("a decode step of %s failed for %s", name, ", ".join(r.id for r in failed), exc_info=e)
            for req in failed:
                del self._running[id(req.seq)]
                self._finished("error")
                req.emit("error", engine_fault(req.id))
            engine.reset()
            return
        finally:
            self.worker_seconds[name] += time.perf_counter() - started
        events: list[tuple[GenerationRequest, str, object]] = []
        for seq, _token in produced:
            req = self._running.get(id(seq))
            if req is None:
                continue
            if seq.error is not None:
                log.error("request %s failed while sampling", req.id, exc_info=seq.error)
                del self._running[id(seq)]
                self._finished("error")
                events.append((req, "error", engine_fault(req.id)))
                continue
            piece = seq.take_text()
            if piece and req.wants_text:
                events.append((req, "text", piece))
            if seq.finished:
                del self._running[id(seq)]
                self._finished(seq.finish_reason)
                events.append((req, "done", seq))
        deliver(events)
        if self.metrics:
            self.metrics.queue(len(self._waiting))

    def _finished(self, reason: str | None) -> None:
        if self.metrics:
            self.metrics.finished(reason)
