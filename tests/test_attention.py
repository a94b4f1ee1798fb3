"""The blocked attention backward of compiled bf16 CPU training (slm.attention) against autograd's gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import slm.attention
from slm.attention import _flash_forward, causal_attention_backward, uses_blocked_backward
from slm.config import ModelConfig
from slm.model import GPT


def reference_gradients(q, k, v, grad_out):  # noqa: ANN001, ANN201
    """dq, dk, dv of causal attention by autograd through PyTorch's SDPA in fp64."""
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    F.scaled_dot_product_attention(*leaves, is_causal=True).backward(grad_out.double())
    return [x.grad for x in leaves]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-4), (torch.bfloat16, 0.02)])
def test_blocked_backward_gives_autograds_gradients(dtype, tolerance):
    """200 positions: one whole block of query rows and a partial one, so both the masked diagonal and the keys
    a later block adds are covered."""
    torch.manual_seed(0)
    q, k, v, grad_out = (torch.randn(2, 3, 200, 16).to(dtype) for _ in range(4))
    out, lse = _flash_forward(q, k, v)
    got = causal_attention_backward(q, k, v, out, lse, grad_out)
    for name, mine, want in zip("qkv", got, reference_gradients(q, k, v, grad_out), strict=True):
        assert mine.dtype == dtype and mine.shape == want.shape
        assert relative_error(mine, want) < tolerance, f"d{name}"


def test_it_is_taken_only_by_compiled_bf16_training_without_dropout_or_shared_heads(monkeypatch):
    q, kv_shared = torch.zeros(1, 4, 8, 16), torch.zeros(1, 2, 8, 16)
    assert not uses_blocked_backward(q, q, 0.0)  # eager: PyTorch's kernel is faster there
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not uses_blocked_backward(q, q, 0.0)  # fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert uses_blocked_backward(q, q, 0.0)
        assert not uses_blocked_backward(q, q, 0.1)
        assert not uses_blocked_backward(q, kv_shared, 0.0)
        with torch.no_grad():
            assert not uses_blocked_backward(q, q, 0.0)


def test_compiled_bf16_training_uses_it_and_matches_eager(monkeypatch):
    """The real model, compiled under bf16 autocast: its backward goes through the blocked attention and its
    gradients agree with eager bf16 training's (PyTorch's kernel) to bf16's precision."""
    traced = []
    monkeypatch.setattr(slm.attention, "causal_attention_backward",
                        lambda *a: traced.append(1) or causal_attention_backward(*a))
    config = ModelConfig(vocab_size=128, context_length=160, n_layer=2, n_head=2, d_model=64, arch="llama")
    torch.manual_seed(0)
    eager = GPT(config)
    compiled = copy.deepcopy(eager)
    tokens, targets = torch.randint(0, 128, (2, 160)), torch.randint(0, 128, (2, 160))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager_loss = eager(tokens, targets=targets)
        compiled_loss = torch.compile(compiled)(tokens, targets=targets)
    eager_loss.backward()
    compiled_loss.backward()
    assert len(traced) == config.n_layer
    assert abs(eager_loss.item() - compiled_loss.item()) < 0.01
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        assert relative_error(b.grad, a.grad) < 0.03, name
