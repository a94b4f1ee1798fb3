"""Optimizers for training: AdamW alone, or Muon for the blocks' matrices with AdamW for the rest.

Muon (Keller Jordan, 2024) orthogonalises each matrix's momentum with a few Newton-Schulz iterations and
steps along that. It suits the 2-D weights inside the transformer blocks; embeddings, norm gains and
biases stay with AdamW (as in the Muon paper and torch.optim.Muon's own advice). Both share one
learning-rate schedule: every parameter group carries its ``base_lr``, scaled by the schedule each step.
"""

from __future__ import annotations

import torch
from torch.optim._muon import _adjust_lr

from slm.config import ConfigError

OPTIMIZERS = ("adamw", "muon")


def newton_schulz(grad: torch.Tensor, steps: int, coefficients: tuple[float, float, float], eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """Approximately orthogonalise each matrix of ``grad [n, rows, cols]`` (torch.optim.Muon's quintic
    iteration) computed in ``dtype``.

    torch.optim.Muon always computes in bf16, which is right on a GPU but on a CPU without native bf16
    runs the iteration ~50x slower than fp32 (measured: ~54 s vs ~1.0 s a step for a 15.5M model). The
    matrices of one shape go through it together: one batched product instead of one small one each.
    """
    a, b, c = coefficients
    x = grad.to(dtype)
    tall = grad.size(-2) > grad.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.mT if tall else x).to(grad.dtype)


def indices_by_shape(tensors: list[torch.Tensor]) -> dict[torch.Size, list[int]]:
    shapes: dict[torch.Size, list[int]] = {}
    for i, t in enumerate(tensors):
        shapes.setdefault(t.shape, []).append(i)
    return shapes


class Muon(torch.optim.Muon):
    """torch.optim.Muon with the Newton-Schulz iteration in a chosen dtype, batched over the matrices of one
    shape (the same update otherwise)."""

    def __init__(self, params, ns_dtype: torch.dtype = torch.bfloat16, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            lr, momentum = float(group["lr"]), group["momentum"]
            torch._foreach_lerp_(bufs, grads, 1 - momentum)
            updates = [g.lerp(buf, momentum) for g, buf in zip(grads, bufs, strict=True)] if group["nesterov"] else bufs
            for shape, indices in indices_by_shape(params).items():
                stacked = torch.stack([updates[i] for i in indices])
                orthogonal = newton_schulz(stacked, group["ns_steps"], group["ns_coefficients"], group["eps"],
                                           self.ns_dtype)
                step_size = _adjust_lr(lr, group["adjust_lr_fn"], shape)
                for i, update in zip(indices, orthogonal.unbind(0), strict=True):
                    if group["weight_decay"]:  # 0 by default: no pass over the matrix multiplying it by 1
                        params[i].mul_(1 - lr * group["weight_decay"])
                    params[i].add_(update, alpha=-step_size)


def ns_dtype_for(device: torch.device, cpu_bf16_fast: bool) -> torch.dtype:
    """bf16 on CUDA and on CPUs where it measures fast (slm.cpu.bf16_pays), fp32 everywhere else."""
    return torch.bfloat16 if device.type == "cuda" or (device.type == "cpu" and cpu_bf16_fast) else torch.float32


class Optimizers:
    """Several optimizers stepped as one, each under a name (its state is saved under that name)."""

    def __init__(self, named: dict[str, torch.optim.Optimizer]) -> None:
        self.named = named

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.named.values() for g in opt.param_groups]

    def set_lr_scale(self, scale: float) -> None:
        for group in self.param_groups:
            group["lr"] = group["base_lr"] * scale

    def step(self) -> None:
        for opt in self.named.values():
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.named.values():
            opt.zero_grad(set_to_none=True)


def split_parameters(model: torch.nn.Module) -> tuple[list, list, list]:
    """(block matrices, embeddings, 1-D gains and biases)."""
    matrices, embeddings, vectors = [], [], []
    for name, p in model.named_parameters():
        if p.dim() < 2:
            vectors.append(p)
        elif name.startswith(("wte", "wpe")):
            embeddings.append(p)
        else:
            matrices.append(p)
    return matrices, embeddings, vectors


def adamw(groups: list[dict], lr: float, betas: tuple[float, float], device: torch.device) -> torch.optim.AdamW:
    for g in groups:
        g["base_lr"] = g["lr"] = g.get("lr", lr)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type == "cuda")


def make_optimizers(model: torch.nn.Module, kind: str, lr: float, weight_decay: float, betas: tuple[float, float],
                    muon_lr: float, muon_momentum: float, device: torch.device, cpu_bf16_fast: bool) -> Optimizers:
    """AdamW on everything (weight decay on block matrices only), or Muon on block matrices + AdamW on the rest."""
    if kind not in OPTIMIZERS:
        raise ConfigError(f"--optimizer {kind!r}: choose {' or '.join(OPTIMIZERS)}")
    matrices, embeddings, vectors = split_parameters(model)
    if kind == "adamw":
        groups = [{"params": matrices, "weight_decay": weight_decay},
                  {"params": embeddings + vectors, "weight_decay": 0.0}]
        return Optimizers({"adamw": adamw(groups, lr, betas, device)})
    # Muon's weight decay is lr * wd per step at a learning rate many times AdamW's, so none by default.
    muon = Muon([{"params": matrices, "lr": muon_lr, "base_lr": muon_lr}], lr=muon_lr, momentum=muon_momentum,
                weight_decay=0.0, ns_dtype=ns_dtype_for(device, cpu_bf16_fast))
    rest = adamw([{"params": embeddings + vectors, "weight_decay": 0.0}], lr, betas, device)
    return Optimizers({"muon": muon, "adamw": rest})
