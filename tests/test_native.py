"""The native decode step (slm/native.py + csrc/decode.c): GPT.forward's logits from one C call, fp16 weights."""

from __future__ import annotations

import pytest
import torch

from slm.generation import Engine, GenerationError
from slm.kv_cache import KVCache

CONTEXT = 64  # the tiny preset's


def test_the_native_step_computes_what_the_model_computes(tiny_model):
    """One C call per step gives GPT.forward's logits, for rows at the same and at different positions."""
    from slm.native import decoder_for

    native = decoder_for(tiny_model)
    assert native is not None, "the native decode step did not build (is a C compiler installed?)"
    tokens = torch.randint(0, 512, (3, 30), generator=torch.Generator().manual_seed(0))
    ours, theirs = KVCache.for_model(tiny_model, 3), KVCache.for_model(tiny_model, 3)
    with torch.inference_mode():
        full = tiny_model(tokens)
        tiny_model(tokens[:, :10], cache=ours), tiny_model(tokens[:, :10], cache=theirs)
        for t in range(10, 30):
            logits = native.step(tokens[:, t : t + 1], ours)
            torch.testing.assert_close(logits, tiny_model(tokens[:, t : t + 1], cache=theirs)[:, -1],
                                       rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(logits, full[:, t], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.k, theirs.k, rtol=1e-5, atol=1e-6)  # the same keys and values cached
        torch.testing.assert_close(ours.v, theirs.v, rtol=1e-5, atol=1e-6)
        for cache in (ours, theirs):  # row 1 steps back 7 positions: rows now at different positions
            cache.lengths[1] -= 7
        torch.testing.assert_close(native.step(tokens[:, :1], ours), tiny_model(tokens[:, :1], cache=theirs)[:, -1],
                                   rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_rows_logits_do_not_depend_on_its_batch(arch):
    """The C step computes its matrix products in tiles of weight rows and batch rows; a row's logits are the same
    bits whether it is decoded alone or beside others (every batch size up to 9: each tile remainder), and the
    model's logits to rounding, at widths that are no multiple of a vector (40, 509)."""
    from slm.config import ModelConfig
    from slm.model import GPT
    from slm.native import decoder_for

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=509, context_length=32, n_layer=2, n_head=2, d_model=40, arch=arch)).eval()
    native = decoder_for(model)
    assert native is not None
    tokens = torch.randint(0, 509, (9, 6), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        full = model(tokens)
        prefilled = KVCache.for_model(model, 9)
        model(tokens[:, :5], cache=prefilled)  # once: PyTorch's own products may differ with the batch

        def logits(rows: slice) -> torch.Tensor:
            cache = KVCache.for_model(model, rows.stop - rows.start)
            cache.k.copy_(prefilled.k[:, rows]), cache.v.copy_(prefilled.v[:, rows])
            cache.lengths.copy_(prefilled.lengths[rows])
            return native.step(tokens[rows, 5:6], cache)

        alone = torch.cat([logits(slice(b, b + 1)) for b in range(9)])
        torch.testing.assert_close(alone, full[:, 5], rtol=1e-5, atol=1e-5)
        for batch in range(2, 10):
            assert torch.equal(logits(slice(0, batch)), alone[:batch]), f"batch {batch}"


def test_native_fp16_weights_stay_close_and_need_the_native_step(tiny_model, monkeypatch):
    from slm.native import decoder_for

    fp32, fp16 = decoder_for(tiny_model), decoder_for(tiny_model, "fp16")
    tokens = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(1))
    a, b = KVCache.for_model(tiny_model, 2), KVCache.for_model(tiny_model, 2)
    with torch.inference_mode():
        tiny_model(tokens[:, :4], cache=a), tiny_model(tokens[:, :4], cache=b)
        gaps = [(fp32.step(tokens[:, t : t + 1], a) - fp16.step(tokens[:, t : t + 1], b)).abs().max()
                for t in range(4, 20)]
    assert 0 < max(gaps) < 1e-2  # rounded weights: close, not equal
    with pytest.raises(ValueError, match="decode weights"):
        decoder_for(tiny_model, "int3")
    monkeypatch.setenv("SLM_NATIVE", "0")
    assert Engine(tiny_model).native is None
    with pytest.raises(GenerationError, match="native decode step"):
        Engine(tiny_model, decode_weights="fp16")
