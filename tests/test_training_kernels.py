"""The paths of compiled bf16 CPU training (slm.training_kernels) against autograd's gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import slm.training_kernels
from slm.config import ModelConfig
from slm.model import GPT
from slm.training_kernels import (
    PYTORCH_KERNELS,
    TrainingKernels,
    _flash_forward,
    causal_attention_backward,
    causal_attention_forward,
    head_loss_and_gradients,
    takes_blocked_attention,
)

ON = TrainingKernels.for_cpu(())  # both paths, the forward blocked too


def reference_gradients(q, k, v, grad_out):  # noqa: ANN001, ANN201
    """dq, dk, dv of causal attention by autograd through PyTorch's SDPA in fp64."""
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    F.scaled_dot_product_attention(*leaves, is_causal=True).backward(grad_out.double())
    return [x.grad for x in leaves]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def reference_log_sum_exp(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Each query row's log-sum-exp of its scaled scores against the keys up to it, in fp64."""
    scores = q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5
    future = torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1)
    return torch.logsumexp(scores.masked_fill(future, float("-inf")), dim=-1)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 0.01)])
def test_blocked_forward_gives_sdpas_output_and_each_rows_log_sum_exp(dtype, tolerance):
    """200 positions: one whole block of query rows and a partial one (see the backward's test)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 200, 16).to(dtype) for _ in range(3))
    out, lse = causal_attention_forward(q, k, v)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    assert out.dtype == dtype and out.shape == want.shape and lse.shape == (2, 3, 200)
    assert relative_error(out, want) < tolerance
    assert (lse.double() - reference_log_sum_exp(q, k)).abs().max().item() < 10 * tolerance


@pytest.mark.parametrize("forward", [_flash_forward, causal_attention_forward])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-4), (torch.bfloat16, 0.02)])
def test_blocked_backward_gives_autograds_gradients(dtype, tolerance, forward):
    """200 positions: one whole block of query rows and a partial one, so both the masked diagonal and the keys
    a later block adds are covered. From either forward's output and log-sum-exp."""
    torch.manual_seed(0)
    q, k, v, grad_out = (torch.randn(2, 3, 200, 16).to(dtype) for _ in range(4))
    out, lse = forward(q, k, v)
    got = causal_attention_backward(q, k, v, out, lse, grad_out)
    for name, mine, want in zip("qkv", got, reference_gradients(q, k, v, grad_out), strict=True):
        assert mine.dtype == dtype and mine.shape == want.shape
        assert relative_error(mine, want) < tolerance, f"d{name}"


def test_it_is_taken_only_by_compiled_bf16_training_without_dropout_or_shared_heads(monkeypatch):
    q, kv_shared = torch.zeros(1, 4, 8, 16), torch.zeros(1, 2, 8, 16)
    assert not takes_blocked_attention(q, q, 0.0, ON)  # eager: PyTorch's kernel is faster there
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not takes_blocked_attention(q, q, 0.0, ON)  # fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert takes_blocked_attention(q, q, 0.0, ON)
        assert not takes_blocked_attention(q, q, 0.1, ON)
        assert not takes_blocked_attention(q, kv_shared, 0.0, ON)
        with torch.no_grad():
            assert not takes_blocked_attention(q, q, 0.0, ON)
        assert not takes_blocked_attention(q, q, 0.0, TrainingKernels(0, 1024))  # off: PyTorch's kernel
        assert not takes_blocked_attention(q, q, 0.0, PYTORCH_KERNELS)  # a model training did not set up


def test_the_cpu_decides_the_forward_and_a_new_model_takes_neither_path():
    assert TrainingKernels.for_cpu(("avx512_bf16", "amx_tile", "amx_bf16")).blocked_forward is False
    assert TrainingKernels.for_cpu(("avx512_bf16",)).blocked_forward is True
    assert GPT(ModelConfig(vocab_size=64, context_length=8, n_layer=1, n_head=2, d_model=16)).kernels == \
        PYTORCH_KERNELS


def test_chunked_head_loss_gives_autograds_loss_and_gradients():
    """150 tokens in chunks of 64 (the last one partial), some targets left out (-100): the loss and both
    gradients equal autograd's through F.cross_entropy (to fp32's precision, the softmax's)."""
    torch.manual_seed(0)
    x, weight = torch.randn(150, 32, dtype=torch.float64), torch.randn(96, 32, dtype=torch.float64)
    targets = torch.randint(0, 96, (150,))
    targets[::7] = -100
    loss, grad_x, grad_weight = head_loss_and_gradients(x, weight, targets, chunk=64)
    leaves = [x.clone().requires_grad_(), weight.clone().requires_grad_()]
    want = F.cross_entropy(F.linear(*leaves), targets)
    want.backward()
    assert abs(loss.item() - want.item()) < 1e-5  # the softmax in fp32
    assert relative_error(grad_x, leaves[0].grad) < 1e-5
    assert relative_error(grad_weight, leaves[1].grad) < 1e-5


@pytest.mark.parametrize(("arch", "blocked_forward"), [("gpt2", False), ("llama", True)])
def test_compiled_bf16_training_uses_them_and_matches_eager(monkeypatch, arch, blocked_forward):
    """The real model, compiled under bf16 autocast: its backward goes through the blocked attention (its
    forward through flash attention or the blocked one, whichever is set: the CPU decides), its loss through
    the chunked head, and its loss and gradients agree with eager bf16 training's (PyTorch's kernels) to bf16's
    precision."""
    traced, forward_traced, loss_traced = [], [], []
    monkeypatch.setattr(slm.training_kernels, "causal_attention_backward",
                        lambda *a: traced.append(1) or causal_attention_backward(*a))
    monkeypatch.setattr(slm.training_kernels, "causal_attention_forward",
                        lambda *a: forward_traced.append(1) or causal_attention_forward(*a))
    monkeypatch.setattr(slm.training_kernels, "head_loss_and_gradients",
                        lambda *a: loss_traced.append(1) or head_loss_and_gradients(*a))
    config = ModelConfig(vocab_size=128, context_length=160, n_layer=2, n_head=2, d_model=64, arch=arch, dropout=0.0)
    torch.manual_seed(0)
    eager = GPT(config)
    compiled = copy.deepcopy(eager)
    compiled.kernels = TrainingKernels(128, 1024, blocked_forward)  # as the Trainer sets them for a CPU
    tokens, targets = torch.randint(0, 128, (2, 160)), torch.randint(0, 128, (2, 160))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager_loss = eager(tokens, targets=targets)
        compiled_loss = torch.compile(compiled)(tokens, targets=targets)
    eager_loss.backward()
    compiled_loss.backward()
    assert (len(traced), len(forward_traced), len(loss_traced)) == (config.n_layer,
                                                                    config.n_layer * blocked_forward, 1)
    assert abs(eager_loss.item() - compiled_loss.item()) < 0.01
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        assert relative_error(b.grad, a.grad) < 0.03, name
