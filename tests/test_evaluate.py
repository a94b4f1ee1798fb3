"""slm eval's sliding window: every token scored once, bits per byte from the same sums."""

from __future__ import annotations

import math

import pytest


def test_eval_sliding_window_scores_every_token_once(trained, tmp_path):
    import torch

    from slm.checkpoint import load
    from slm.evaluate import evaluate_text, score_tokens

    model, tok = load(trained)
    ids = [tok.eot_id] + tok.encode("Once upon a time there was a little fox named Tom. " * 12)
    assert len(ids) > 2 * model.config.context_length
    nll, count = score_tokens(model, ids, stride=16)
    assert count == len(ids) - 1
    # Stride 1 gives each prediction the longest possible context; a short text equals one plain pass.
    short = ids[:40]
    nll_short, _ = score_tokens(model, short)
    with torch.no_grad():
        logits = model(torch.tensor([short[:-1]]))
    direct = torch.nn.functional.cross_entropy(logits[0], torch.tensor(short[1:]), reduction="sum")
    assert nll_short == pytest.approx(float(direct), rel=1e-5)
    r = evaluate_text(model, tok, ["Once upon a time there was a little fox named Tom."])
    assert r["bits_per_byte"] == pytest.approx(r["loss"] * r["tokens"] / math.log(2) / r["bytes"])
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
