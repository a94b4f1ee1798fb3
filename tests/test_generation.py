"""Generation: the KV cache changes nothing but speed, batching changes nothing, sampling is reproducible."""

from __future__ import annotations

import pytest
import torch

from helpers import fail_sampling_for_seed
from slm.generation import Engine, GenerationError, SamplingParams, apply_penalties, generate, sample, stream

CONTEXT = 64  # the tiny preset's


@pytest.fixture(params=["native", "torch"])
def decode_path(request, monkeypatch):
    """Cached decode steps in C (slm/native.py, the default) or in GPT.forward (SLM_NATIVE=0)."""
    if request.param == "torch":
        monkeypatch.setenv("SLM_NATIVE", "0")
    else:
        monkeypatch.delenv("SLM_NATIVE", raising=False)
    return request.param


@pytest.mark.parametrize("new_tokens", [1, 10, CONTEXT - 8, CONTEXT, CONTEXT + 1, 3 * CONTEXT])
def test_cache_and_no_cache_agree_at_every_length(tiny_model, new_tokens, decode_path):
    prompt = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(new_tokens))
    cached = generate(tiny_model, prompt, SamplingParams(max_new_tokens=new_tokens, temperature=0), use_cache=True)
    uncached = generate(tiny_model, prompt, SamplingParams(max_new_tokens=new_tokens, temperature=0), use_cache=False)
    assert cached.shape == (1, 8 + new_tokens)
    assert cached.tolist() == uncached.tolist()


def test_cache_agrees_with_a_prompt_longer_than_the_context(tiny_model, decode_path):
    prompt = torch.randint(0, 512, (1, CONTEXT + 30), generator=torch.Generator().manual_seed(5))
    cached = generate(tiny_model, prompt, SamplingParams(max_new_tokens=100, temperature=0), use_cache=True)
    uncached = generate(tiny_model, prompt, SamplingParams(max_new_tokens=100, temperature=0), use_cache=False)
    assert cached.tolist() == uncached.tolist()


def test_batch_of_different_lengths_equals_each_alone(tiny_model, decode_path):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (1, 5, 17, 40, 63, 64, 90)]
    alone = [generate(tiny_model, [p], SamplingParams(max_new_tokens=2 * CONTEXT, temperature=0))[0] for p in prompts]
    assert generate(tiny_model, prompts, SamplingParams(max_new_tokens=2 * CONTEXT, temperature=0)) == alone
    if decode_path == "torch":  # without the cache there is no decode step to choose: once per family
        params = SamplingParams(max_new_tokens=2 * CONTEXT, temperature=0)
        assert generate(tiny_model, prompts, params, use_cache=False) == alone


def test_sequences_join_and_leave_a_running_batch(tiny_model, decode_path):
    """Continuous batching: a request added mid-way gets exactly what it gets alone."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (4, 30, 11, 50)]
    lengths = [20, 90, 5, 70]
    alone = [generate(tiny_model, [p], SamplingParams(max_new_tokens=n, temperature=0))[0][len(p):]
             for p, n in zip(prompts, lengths, strict=True)]
    engine = Engine(tiny_model, max_batch=4)
    seqs = [engine.add(prompts[0], SamplingParams(max_new_tokens=lengths[0], temperature=0))]
    for step in range(400):
        if step in (3, 7, 25):
            i = len(seqs)
            seqs.append(engine.add(prompts[i], SamplingParams(max_new_tokens=lengths[i], temperature=0)))
        engine.step()
        if not engine.active and len(seqs) == 4:
            break
    assert [s.generated for s in seqs] == alone


def test_seeded_sampling_is_reproducible(tiny_model):
    prompt = torch.randint(0, 512, (2, 6))
    kwargs = dict(max_new_tokens=40, temperature=1.0, top_k=50, top_p=0.9)
    a = generate(tiny_model, prompt, SamplingParams(seed=7, **kwargs))
    b = generate(tiny_model, prompt, SamplingParams(seed=7, **kwargs))
    c = generate(tiny_model, prompt, SamplingParams(seed=8, **kwargs))
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()
    # The seed gives the same text with and without the cache too.
    assert generate(tiny_model, prompt, SamplingParams(seed=7, **kwargs), use_cache=False).tolist() == a.tolist()


def test_top_k_and_top_p_filtering():
    logits = torch.tensor([5.0, 4.0, 1.0, 0.0, -1.0])
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, SamplingParams(temperature=1.0, top_k=2), g) for _ in range(300)}
    assert draws == {0, 1}
    # Token 0 holds ~72% of the mass: top_p 0.5 keeps it alone, 0.9 adds token 1.
    assert {sample(logits, SamplingParams(temperature=1.0, top_p=0.5), g) for _ in range(200)} == {0}
    assert {sample(logits, SamplingParams(temperature=1.0, top_p=0.9), g) for _ in range(300)} == {0, 1}
    assert sample(logits, SamplingParams(temperature=0), None) == 0


def test_prefill_is_one_pass_and_each_token_one_pass(tiny_model, monkeypatch):
    monkeypatch.setenv("SLM_NATIVE", "0")  # count GPT.forward's passes (the native step is one C call)
    calls = []
    original = tiny_model.forward

    def counting(tokens, *args, **kwargs):
        calls.append(tokens.shape[1])
        return original(tokens, *args, **kwargs)

    monkeypatch.setattr(tiny_model, "forward", counting)
    generate(tiny_model, torch.randint(0, 512, (1, 20)), SamplingParams(max_new_tokens=10, temperature=0))
    assert calls == [19] + [1] * 10  # the prompt minus its last token, then one token per pass


def test_stop_strings_and_end_of_text(trained_any):
    from slm.checkpoint import load

    model, tok = load(trained_any)
    prompt = tok.encode("Once upon a time there was a little")
    engine = Engine(model, tok, max_batch=1)
    seq = engine.add(prompt, SamplingParams(max_new_tokens=200, temperature=0, stop=(".",)))
    while engine.active:
        engine.step()
    assert seq.finish_reason == "stop" and "." not in seq.text and seq.text
    # Without a stop string the trained model ends its story with <|endoftext|> before 200 tokens.
    engine = Engine(model, tok, max_batch=1)
    seq = engine.add(prompt, SamplingParams(max_new_tokens=200, temperature=0))
    while engine.active:
        engine.step()
    assert seq.finish_reason == "eot" and tok.eot_id not in seq.generated
    assert "The end." in seq.text


def test_stream_yields_pieces_that_join_to_the_text(trained_any):
    from slm.checkpoint import load

    model, tok = load(trained_any)
    pieces = list(stream(model, tok, "One day Tom", SamplingParams(max_new_tokens=60, temperature=0)))
    greedy = SamplingParams(max_new_tokens=60, temperature=0)
    full = generate(model, [tok.encode("One day Tom")], greedy, tokenizer=tok)[0]
    assert len(pieces) > 5
    assert "".join(pieces) == tok.decode(full[len(tok.encode("One day Tom")):])


def test_stream_never_splits_a_character(trained):
    from slm.checkpoint import load
    from slm.tokenizer import _bytes_to_unicode

    model, tok = load(trained)
    # Feed multi-byte characters one byte token at a time: each comes out whole, once complete.
    table = _bytes_to_unicode()
    decoder = tok.stream_decoder()
    pieces = [decoder.push(tok.hf.token_to_id(table[b])) for b in "é🙂".encode()]
    assert pieces == ["", "é", "", "", "", "🙂"]
    # A hot sampler emits arbitrary byte tokens; the streamed pieces still join to the decoded text.
    engine = Engine(model, tok, max_batch=1)
    seq = engine.add(tok.encode("Once"), SamplingParams(max_new_tokens=80, temperature=5.0, seed=1))
    streamed = []
    while engine.active:
        engine.step()
        streamed.append(seq.take_text())
    assert "".join(streamed) == tok.decode(seq.generated)


@pytest.mark.parametrize("kwargs, field", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 10**7}, "max_new_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -3}, "top_k"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"presence_penalty": -3}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_p": 1.5}, "min_p"),
    ({"temperature": 1e-40}, "temperature"),  # 0 in float32 but not greedy: refused
    ({"temperature": 5.5}, "temperature"),
    ({"repetition_penalty": 1e-300}, "repetition_penalty"),
    ({"stop": ["x" * 201]}, "stop"),
])
def test_bad_settings_raise_value_errors_naming_the_field(tiny_model, kwargs, field):
    with pytest.raises(ValueError, match=field):
        generate(tiny_model, [[1, 2, 3]], SamplingParams(**kwargs))


@pytest.mark.parametrize("settings", [
    {"temperature": 1e-4},
    {"temperature": 1e-4, "top_p": 5e-324},  # top_p rounds to 0 in float32: the top token still survives
    {"temperature": 5.0, "top_k": 10**18, "min_p": 1.0},
    {"temperature": 1.0, "min_p": 5e-324},
])
def test_sampling_at_the_bounds_gives_a_token(settings):
    logits = torch.tensor([1e4, -1e4, 0.0, 3.0, 3.0])  # far apart, and a tie
    token = sample(logits, SamplingParams(**settings), torch.Generator().manual_seed(0))
    assert 0 <= token < 5
    if settings.get("temperature") == 1e-4 or settings.get("top_p"):
        assert token == 0  # as good as greedy


def test_a_sampling_error_ends_its_own_sequence_only(tiny_model, monkeypatch):
    fail_sampling_for_seed(monkeypatch, 666)
    engine = Engine(tiny_model, max_batch=3)
    seqs = [engine.add([1, 2, 3], SamplingParams(max_new_tokens=12, temperature=1.0, seed=s)) for s in (1, 666, 2)]
    while engine.active:
        engine.step()
    assert [s.finish_reason for s in seqs] == ["length", "error", "length"]
    assert isinstance(seqs[1].error, RuntimeError) and not seqs[1].generated
    alone = [generate(tiny_model, [[1, 2, 3]], SamplingParams(max_new_tokens=12, temperature=1.0, seed=s))[0]
             for s in (1, 2)]
    assert [seqs[0].prompt + seqs[0].generated, seqs[2].prompt + seqs[2].generated] == alone
    with pytest.raises(RuntimeError, match="injected"):  # a library caller sees the error itself
        generate(tiny_model, [[1, 2, 3]], SamplingParams(max_new_tokens=4, temperature=1.0, seed=666))


def test_empty_prompt_and_bad_token_ids(tiny_model):
    with pytest.raises(GenerationError, match="empty"):
        generate(tiny_model, [[]], SamplingParams(max_new_tokens=3))
    with pytest.raises(GenerationError, match="token ids"):
        generate(tiny_model, [[1, 99999]], SamplingParams(max_new_tokens=3))


def test_identical_requests_in_one_batch(tiny_model):
    """Equal prompts and settings are still separate sequences (rows are tracked by identity)."""
    engine = Engine(tiny_model, max_batch=4)
    seqs = [engine.add([5, 6, 7], SamplingParams(max_new_tokens=n, temperature=0)) for n in (30, 30, 10, 30)]
    while engine.active:
        engine.step()
    alone = generate(tiny_model, [[5, 6, 7]], SamplingParams(max_new_tokens=30, temperature=0))[0][3:]
    assert [s.generated for s in seqs] == [alone, alone, alone[:10], alone]


# ---- repetition control --------------------------------------------------------------------------------
def test_penalties_against_a_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, True]] * 2)  # token 1 only in the prompt, 0 and 3 generated
    counts = torch.tensor([[2.0, 0.0, 0.0, 1.0]] * 2)
    params = [SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25), SamplingParams()]
    out = apply_penalties(logits, counts, seen, params)
    # repetition /2 or x2 on seen tokens: [1, -2, 0.5, 1.5]; then - 0.5 x counts - 0.25 x (counts > 0)
    assert out[0].tolist() == [-0.25, -2.0, 0.5, 0.75]
    assert out[1].tolist() == logits[1].tolist()  # a row without penalties is untouched


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (2, 12), generator=g)
    scores = torch.randn(2, 50, generator=g)
    seen = torch.zeros(2, 50, dtype=torch.bool).scatter_(1, ids, True)
    ours = apply_penalties(scores.clone(), torch.zeros(2, 50), seen, [SamplingParams(repetition_penalty=1.3)] * 2)
    theirs = RepetitionPenaltyLogitsProcessor(penalty=1.3)(ids, scores.clone())
    assert torch.allclose(ours, theirs)


def test_min_p_keeps_tokens_near_the_top():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    g = torch.Generator().manual_seed(0)
    # min_p 0.2: threshold 0.2 x 0.5 = 0.1, so token 3 (0.05) is never drawn and the other three are.
    assert {sample(logits, SamplingParams(temperature=1.0, min_p=0.2), g) for _ in range(400)} == {0, 1, 2}
    assert {sample(logits, SamplingParams(temperature=1.0, min_p=0.7), g) for _ in range(100)} == {0}


def test_penalised_rows_batched_cached_and_alone_agree(tiny_model):
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (3, 20, 9)]
    controls = {"repetition_penalty": 1.5, "frequency_penalty": 0.5, "presence_penalty": 0.3}
    params = SamplingParams(max_new_tokens=80, temperature=0, **controls)
    alone = [generate(tiny_model, [p], params)[0] for p in prompts]
    assert generate(tiny_model, prompts, params) == alone
    assert generate(tiny_model, prompts, params, use_cache=False) == alone
    plain = [generate(tiny_model, [p], SamplingParams(max_new_tokens=80, temperature=0))[0] for p in prompts]
    assert plain != alone  # the penalties changed what greedy decoding picks
