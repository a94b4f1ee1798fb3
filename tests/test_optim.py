"""The optimizers: Muon's parameter groups, the schedule that scales both, Newton-Schulz precision."""

from __future__ import annotations

import math

import pytest

from helpers import quick_cfg


def test_muon_groups_and_schedule():
    """Muon takes the blocks' matrices; AdamW the embeddings, gains and biases; one schedule scales both."""
    import torch

    from slm.config import get_preset
    from slm.model import GPT
    from slm.optim import make_optimizers

    model = GPT(get_preset("tiny").config)
    opts = make_optimizers(model, "muon", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), muon_lr=0.02,
                           muon_momentum=0.95, device=torch.device("cpu"), cpu_bf16_fast=False)
    muon_params = {id(p) for g in opts.named["muon"].param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in muon_params) == (name.startswith("h.") and p.dim() == 2), name
    opts.set_lr_scale(0.5)
    assert sorted(g["lr"] for g in opts.param_groups) == [5e-4, 0.01]
    with pytest.raises(ValueError, match="--optimizer 'sgd'"):
        make_optimizers(model, "sgd", 1e-3, 0.1, (0.9, 0.95), 0.02, 0.95, torch.device("cpu"), False)


def test_muon_newton_schulz_runs_in_fp32_on_a_cpu_without_bf16():
    import torch

    from slm.optim import Muon, newton_schulz, ns_dtype_for

    assert ns_dtype_for(torch.device("cpu"), cpu_bf16_fast=False) == torch.float32
    assert ns_dtype_for(torch.device("cpu"), cpu_bf16_fast=True) == torch.bfloat16
    assert ns_dtype_for(torch.device("cuda"), cpu_bf16_fast=False) == torch.bfloat16
    from slm.config import get_preset
    from slm.cpu import bf16_pays
    from slm.model import GPT
    from slm.train import make_optimizer

    chosen = make_optimizer(GPT(get_preset("tiny").config), quick_cfg(optimizer="muon"), torch.device("cpu"))
    assert chosen.named["muon"].ns_dtype == (torch.bfloat16 if bf16_pays() else torch.float32)

    def one_step(optimizer_cls, **kw):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(48, 32))
        w.grad = torch.randn(48, 32)
        optimizer_cls([w], lr=0.02, momentum=0.95, weight_decay=0.0, **kw).step()
        return w.detach().clone(), w.grad

    stock, grad = one_step(torch.optim.Muon)  # torch's own, Newton-Schulz in bf16
    ours_bf16, _ = one_step(Muon, ns_dtype=torch.bfloat16)
    ours_fp32, _ = one_step(Muon, ns_dtype=torch.float32)
    assert torch.equal(ours_bf16, stock)  # the same algorithm as torch.optim.Muon
    assert not torch.equal(ours_fp32, stock)
    torch.manual_seed(0)
    start = torch.randn(48, 32)
    update = newton_schulz((0.05 * grad + 0.95 * (0.05 * grad))[None], 5, (3.4445, -4.7750, 2.0315), 1e-7,
                           torch.float64)[0]
    expected = start - 0.02 * math.sqrt(48 / 32) * update.float()  # nesterov: g.lerp(buf, 0.95), buf = 0.05 g
    assert (ours_fp32 - expected).abs().max() < 1e-5 < (stock - expected).abs().max()


def test_muon_steps_matrices_of_one_shape_together_as_it_would_alone():
    """Matrices of one shape share a batched Newton-Schulz iteration: each gets the update it gets alone."""
    import torch

    from slm.optim import Muon

    torch.manual_seed(0)
    shapes = [(48, 32), (48, 32), (32, 48), (16, 16), (48, 32)]
    start = [torch.randn(s) for s in shapes]
    grads = [torch.randn(s) for s in shapes]

    def stepped(indices):
        ws = [torch.nn.Parameter(start[i].clone()) for i in indices]
        for w, i in zip(ws, indices, strict=True):
            w.grad = grads[i].clone()
        Muon(ws, ns_dtype=torch.float32, lr=0.02, momentum=0.95, weight_decay=0.0).step()
        return [w.detach() for w in ws]

    together = stepped(range(len(shapes)))
    for i, w in enumerate(together):
        alone = stepped([i])[0]
        assert not torch.equal(w, start[i])
        assert (w - alone).abs().max() < 1e-6
