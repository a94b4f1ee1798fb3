"""The serving engine's scheduler (slm.server.engine), in-process with fake models: how the variants share the
one worker thread. Over HTTP, tests/test_server.py covers the same engine with the real model."""

from __future__ import annotations

import asyncio
import time

from helpers import WindowSumModel, greedy
from slm.generation import Engine
from slm.server.engine import GenerationRequest, ServingEngine


class SlowModel(WindowSumModel):
    """The fake model, with every forward pass taking at least ``seconds`` (a stand-in for a costly step)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, *args, **kwargs):
        time.sleep(self.seconds)
        return super().forward(*args, **kwargs)


def serving(**models) -> ServingEngine:
    engines = {name: Engine(model, max_batch=2, use_cache=False, decode_step="torch") for name, model in models.items()}
    return ServingEngine(engines, tokenizer=None)


async def finished(request: GenerationRequest) -> None:
    for _ in range(10_000):  # bounded: every step sends at most one event
        kind, _payload = await asyncio.wait_for(request.events.get(), timeout=60)
        if kind in ("done", "error"):
            assert kind == "done", _payload
            return
    raise AssertionError("no end to the request")


def run_together(engine: ServingEngine, first: tuple[str, int], second: tuple[str, int], head_start: int = 0):
    """Submit ``first`` (variant, tokens), then, once it has ``head_start`` tokens, ``second``. Returns how many
    tokens the first had when the second finished, and when the second was submitted."""

    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        a = GenerationRequest(first[0], [1, 2], greedy(first[1]), loop, wants_text=False)
        b = GenerationRequest(second[0], [3, 4], greedy(second[1]), loop, wants_text=False)
        engine.submit(a)
        for _ in range(6_000):  # bounded: at most 60 s
            if a.seq is not None and len(a.seq.generated) >= head_start:
                break
            await asyncio.sleep(0.01)
        at_submit = len(a.seq.generated)
        engine.submit(b)
        await finished(b)
        at_done = len(a.seq.generated)
        await finished(a)
        return at_done, at_submit

    engine.start()
    try:
        return asyncio.run(main())
    finally:
        engine.stop()


def test_a_slow_variant_does_not_hold_up_a_fast_one():
    """A variant whose steps cost 20 ms (an uncached model at a long sequence) shares the worker by time: the
    fast variant's 60 tokens are done within a few of the slow one's steps, not one fast step per slow step."""
    slow_tokens, _ = run_together(serving(fast=WindowSumModel(), slow=SlowModel(0.02)), ("slow", 80), ("fast", 60))
    assert slow_tokens < 30  # stepping every variant every round: >= 60


def test_idle_time_is_not_saved_up():
    """Two variants of equal cost: one runs alone for a while, then the other arrives. They take turns from
    then on; the newcomer does not get a long run of its own steps for the time it was idle."""
    at_done, at_submit = run_together(serving(a=SlowModel(0.005), b=SlowModel(0.005)), ("a", 120), ("b", 30),
                                      head_start=40)
    assert at_submit >= 40
    assert at_done - at_submit >= 15  # turns: ~30; with idle time saved up, the newcomer's 30 would come first
