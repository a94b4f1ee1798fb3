"""The model shipped in models/: it loads offline, decodes the same with and without the cache, and has learnt."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import slm
from slm.checkpoint import DEFAULT_MODEL, models_dir
from slm.evaluate import evaluate_text
from slm.generation import SamplingParams, generate
from slm.model import GPT

# A short story written for this test (not from the training corpus).
STORY = (
    "Once upon a time there was a little girl named Rosie who lived in a small house at the edge of the "
    "woods. Every morning she fed the hens and gave a carrot to the old grey horse. One day she heard a "
    "sound in the garden. It was a tiny rabbit, caught in the fence. Rosie was very gentle. She lifted the "
    "wire and the rabbit hopped away into the grass. \"Thank you!\" it seemed to say. Rosie smiled and went "
    "back inside, where her mother was baking bread for supper."
)


def test_bundled_model_directory():
    path = models_dir() / DEFAULT_MODEL
    files = {p.name: p.stat().st_size for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(files)
    assert sum(files.values()) < 40e6
    meta = json.loads((path / "config.json").read_text())
    assert meta["weights_dtype"] == "float16"
    assert meta["training"]["tokens_seen"] > 0 and meta["training"]["best_val_bpb"] > 0
    assert meta["template"] == "words-v1"  # trained on the request format: --words and "words" are accepted
    points = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    legs = sorted({m["leg"] for m in points})
    assert legs == list(range(1, len(legs) + 1))  # every leg's points, counted on (tools/bundle_model.py):
    logged = [m for m in points if m["kind"] != "leg"]
    for leg in legs[1:]:  # each leg's points come after the one before it ended, in steps and in tokens
        before, this = ([m for m in logged if m["leg"] == k] for k in (leg - 1, leg))
        assert this[0]["step"] > before[-1]["step"] and this[0]["tokens"] > before[-1]["tokens"]
    for start in (m for m in points if m["kind"] == "leg"):  # where a leg began, and on what
        assert start["precision"] in ("fp32", "bf16") and start["hardware"]
        assert start["step"] < min(m["step"] for m in logged if m["leg"] == start["leg"])


@pytest.mark.slow
def test_loads_by_default_and_decodes_the_same_with_and_without_cache():
    model, tok = slm.load("default")
    meta = json.loads((models_dir() / DEFAULT_MODEL / "config.json").read_text())
    assert model.num_parameters() == meta["training"]["parameters"] and tok.vocab_size == 8192
    prompt = [tok.encode("Once upon a time")]
    cached = generate(model, prompt, SamplingParams(max_new_tokens=80, temperature=0), use_cache=True)
    plain = generate(model, prompt, SamplingParams(max_new_tokens=80, temperature=0), use_cache=False)
    assert cached == plain
    assert tok.decode(cached[0]).startswith("Once upon a time")


def test_bits_per_byte_far_below_an_untrained_model():
    model, tok = slm.load("default")
    trained = evaluate_text(model, tok, [STORY])["bits_per_byte"]
    torch.manual_seed(0)
    untrained = evaluate_text(GPT(model.config).eval(), tok, [STORY])["bits_per_byte"]
    assert untrained > 3.0
    assert trained < 0.7 * untrained, (trained, untrained)


def repeated_trigrams(tokens: list[int]) -> int:
    grams = [tuple(tokens[i : i + 3]) for i in range(len(tokens) - 2)]
    return len(grams) - len(set(grams))


def test_penalties_make_greedy_output_repeat_less():
    """Greedy decoding of the bundled model loops; repetition control breaks the loops (direction only)."""
    model, tok = slm.load("default")
    prompts = ["Once upon a time", "The little rabbit", "One day the king said", "In the forest there was"]
    counts = {}
    for name, controls in {"plain": {}, "penalised": {"repetition_penalty": 1.3, "frequency_penalty": 0.3}}.items():
        params = SamplingParams(max_new_tokens=80, temperature=0, **controls)
        outs = generate(model, [tok.encode(p) for p in prompts], params)
        counts[name] = sum(repeated_trigrams(o[len(tok.encode(p)) :]) for o, p in zip(outs, prompts, strict=True))
    print("repeated 3-grams over 4 prompts x 80 greedy tokens:", counts)
    assert counts["penalised"] < counts["plain"], counts


def load_tool(name: str):
    """A script of tools/ as a module."""
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bundling_numbers_the_legs_of_a_resumed_run_and_counts_on_from_an_earlier_model():
    tool = load_tool("bundle_model")
    point = lambda step, **kw: {"kind": "train", "step": step, "tokens": 10 * step, "elapsed": float(step), **kw}  # noqa: E731
    leg = lambda step: {"kind": "leg", "step": step, "tokens": 10 * step, "elapsed": float(step)}  # noqa: E731
    # A run begun before `slm train` wrote leg records (its first leg unmarked), then resumed twice.
    run = [point(1), point(2), leg(2), point(3), leg(3), point(4)]
    assert [m["leg"] for m in tool.numbered_legs(run)] == [1, 1, 2, 2, 3, 3]
    assert [m["leg"] for m in tool.numbered_legs([leg(0), point(1), leg(1), point(2)])] == [1, 1, 2, 2]
    # Fine-tuned (--init-from) from a model whose leg 2 (steps counted on: 6, 8, 10) was taken at its own step 5.
    earlier = [point(2, leg=1), point(4, leg=1), point(6, leg=2), point(8, leg=2), point(10, leg=2)]
    joined = tool.joined_metrics(earlier, [leg(0), point(1), leg(1), point(2)], {"steps": 5, "tokens_seen": 50})
    assert [(m["leg"], m["step"]) for m in joined] == [(1, 2), (1, 4), (2, 6), (2, 8), (3, 9), (3, 10), (4, 10),
                                                       (4, 11)]


def test_card_tables_count_each_leg_and_each_hour_of_a_resumed_run():
    tool = load_tool("bundle_model")
    report = load_tool("run_report")

    def point(kind, step, elapsed, **kw):
        return {"kind": kind, "step": step, "tokens": 100 * step, "elapsed": elapsed, **kw}

    run = [point("leg", 0, 0.0, hardware="cpu A", precision="bf16", compiled=True),
           point("train", 10, 1800.0, tokens_per_s=2.0), point("eval", 10, 1800.0, val_bpb=1.5),
           point("train", 20, 3600.0, tokens_per_s=4.0),
           point("leg", 20, 3600.0, hardware="cpu B", precision="fp32", compiled=False),
           point("train", 30, 5400.0, tokens_per_s=6.0), point("eval", 30, 5400.0, val_bpb=1.25),
           point("train", 40, 7200.0, tokens_per_s=8.0)]
    assert tool.up_to(run, 20) == run[:4]  # best/ at step 20: the next leg's record and points left out
    legs = report.legs_table(tool.numbered_legs(run))
    assert "| 1 | ? | cpu A; bf16, compiled | 0-20 | 2,000 | 1 h 0 min (3,600 s) | 3 (2-4) | 1.500 (10) |" in legs
    assert "| 2 | ? | cpu B; fp32 | 20-40 | 2,000 | 1 h 0 min (3,600 s) | 7 (6-8) | 1.250 (30) |" in legs
    assert "Together: 40 optimizer steps, 4,000 tokens, 2 h 0 min (7,200 s), 1 tokens/s overall." in legs
    hours = report.hour_log(tool.numbered_legs(run)).splitlines()[2:]
    assert hours == ["| 0-1 | 20 | 2,000 | 1 | 1.500 (step 10) |", "| 1-2 | 40 | 4,000 | 1 | 1.250 (step 30) |"]
