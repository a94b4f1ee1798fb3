"""The decode engine's bookkeeping, with a fake model (as nanochat's engine tests do): prefill, continuous
batching, rows moving down, the window shift, end-of-text and limits. No real model, so these run in
milliseconds and a failure points at the scheduler, not at the maths."""

from __future__ import annotations

import pytest

from helpers import CONTEXT, VOCAB, WindowSumModel, greedy
from slm.generation import Engine, GenerationError, SamplingParams


def reference(prompt: list[int], n: int, shift: int = CONTEXT // 4) -> list[int]:
    """The documented schedule by hand: append while the window is short, else keep its last context - shift."""
    window, out = list(prompt[-CONTEXT:]), []
    for _ in range(n):
        token = sum(window) % VOCAB
        out.append(token)
        window = window + [token] if len(window) < CONTEXT else (window + [token])[-(CONTEXT - shift):]
    return out


def run(engine: Engine, work: list[tuple[list[int], int]]) -> list[list[int]]:
    """Feed the engine more sequences than it has rows: each joins as soon as a row is free."""
    waiting, running, done = list(enumerate(work)), [], {}
    for _ in range(10_000):  # bounded
        while waiting and engine.free_slots:
            i, (prompt, n) = waiting.pop(0)
            running.append((i, engine.add(prompt, greedy(n))))
        if not running:
            break
        engine.step()
        for i, seq in [r for r in running if r[1].finished]:
            done[i] = seq.generated
        running = [r for r in running if not r[1].finished]
    return [done[i] for i in range(len(work))]


@pytest.mark.parametrize("use_cache", [True, False])
def test_continuous_batching_and_window_shift_follow_the_schedule(use_cache):
    work = [([5, 6, 7], 40), ([1], 3), (list(range(1, 30)), 25), ([9, 9], 17), ([2, 3, 4, 5], 1), ([8], 33)]
    engine = Engine(WindowSumModel(), max_batch=3, use_cache=use_cache, decode_step="torch")
    assert run(engine, work) == [reference(p, n) for p, n in work]
    assert not engine.active and engine.free_slots == 3


def test_rows_move_down_when_a_sequence_finishes():
    engine = Engine(WindowSumModel(), max_batch=3, decode_step="torch")
    short, long_a, long_b = (engine.add(p, greedy(n)) for p, n in [([1], 2), ([2], 6), ([3], 6)])
    engine.step(), engine.step()
    assert short.finished and engine.active == [long_a, long_b]  # survivors moved down into rows 0 and 1
    late = engine.add([4], greedy(3))
    while engine.active:
        engine.step()
    assert [long_a.generated, long_b.generated, late.generated] == [reference([2], 6), reference([3], 6),
                                                                    reference([4], 3)]


def test_end_of_text_ends_a_sequence_unless_its_params_say_not():
    prompt = [VOCAB - 10, 4, 5]
    expected = reference(prompt, 30)
    eot = expected[5]  # call the sixth token end-of-text
    first_eot = expected.index(eot)
    engine = Engine(WindowSumModel(), eot_id=eot, decode_step="torch")
    ends = engine.add(prompt, SamplingParams(max_new_tokens=30, temperature=0))
    runs_on = engine.add(prompt, greedy(30))
    while engine.active:
        engine.step()
    assert ends.finish_reason == "eot" and ends.generated == expected[:first_eot]
    assert runs_on.finish_reason == "length" and runs_on.generated == expected


def test_engine_limits_and_bad_prompts():
    engine = Engine(WindowSumModel(), max_batch=1, decode_step="torch")
    with pytest.raises(GenerationError, match="prompt is empty"):
        engine.add([], greedy(1))
    with pytest.raises(GenerationError, match=r"prompt token ids must be in \[0, 97\)"):
        engine.add([VOCAB], greedy(1))
    engine.add([1], greedy(1))
    with pytest.raises(GenerationError, match="engine is full"):
        engine.add([1], greedy(1))
    with pytest.raises(GenerationError, match="decode_step must be one of"):
        Engine(WindowSumModel(), decode_step="fast")
    with pytest.raises(GenerationError, match="shift must be in"):
        Engine(WindowSumModel(), shift=CONTEXT)


def test_one_forward_pass_per_decode_step_for_the_whole_batch():
    model = WindowSumModel()
    engine = Engine(model, max_batch=4, decode_step="torch")
    seqs = [engine.add([i + 1] * (i + 2), greedy(5)) for i in range(4)]  # four prompt lengths
    engine.step()
    first = model.calls  # the prefill (one pass: the rows are contiguous and all new) + one decode pass
    engine.step()
    assert first == 2 and model.calls == 3
    assert all(len(s.generated) == 2 for s in seqs)
