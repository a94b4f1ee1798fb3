"""Causal attention for compiled bf16 training on a CPU: PyTorch's flash-attention forward, a faster backward.

PyTorch's CPU flash-attention backward takes about five times its forward in bf16, so at ``cpu-7m``'s width
attention was a third of a training step (docs/training-on-cpu.md). The backward here recomputes the attention
weights from the forward's log-sum-exp, one block of query rows at a time against only the keys those rows
may see, as batched bf16 matrix products (AMX where the CPU has it); torch.compile fuses the elementwise work
between them. Uncompiled that elementwise work is a dozen separate passes and slower than PyTorch's kernel,
so ``causal_attention`` uses it only while torch.compile traces the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

QUERY_BLOCK = 128  # query rows a backward block recomputes; the fastest of 64/128/256/512 (see the docs)


def _flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's CPU flash attention (causal): the output and each query row's log-sum-exp of its scores."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
    return out, lse


def causal_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                              lse: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gradients of causal softmax attention for ``q, k, v [B, H, T, D]``, rebuilt block by block from ``lse``.

    Each block of query rows ``r0:r1`` sees keys ``0:r1``: weights ``p = exp(q k^T * scale - lse)`` (zero above
    the diagonal), then ``dv += p^T do``, ``ds = p * (do v^T - rowsum(do * out)) * scale``, ``dq = ds k``,
    ``dk += ds^T q``. Products run in the inputs' dtype, the weights and the sums of the blocks' parts in fp32.
    The blocks' parts are gathered in lists rather than added into slices: torch.compile turns each slice
    update into a copy of the whole tensor.
    """
    scale = q.shape[-1] ** -0.5
    t = q.shape[2]
    q, k, v, grad_out = (x.contiguous() for x in (q, k, v, grad_out))  # row blocks become views, not copies
    delta = (grad_out.float() * out.float()).sum(-1, keepdim=True)  # rowsum(do * out): softmax's backward term
    dq_blocks, dk_parts, dv_parts = [], [], []
    for r0 in range(0, t, QUERY_BLOCK):
        r1 = min(t, r0 + QUERY_BLOCK)
        q_rows, grad_rows, keys, values = q[:, :, r0:r1], grad_out[:, :, r0:r1], k[:, :, :r1], v[:, :, :r1]
        weights = torch.exp(torch.matmul(q_rows, keys.transpose(-1, -2)).float() * scale - lse[:, :, r0:r1, None])
        future = torch.ones(r1 - r0, r1, dtype=torch.bool, device=q.device).triu_(r0 + 1)  # keys after each row
        weights = weights.masked_fill(future, 0.0)
        dv_parts.append(torch.matmul(weights.to(q.dtype).transpose(-1, -2), grad_rows))
        grad_weights = torch.matmul(grad_rows, values.transpose(-1, -2)).float()
        grad_scores = (weights * (grad_weights - delta[:, :, r0:r1]) * scale).to(q.dtype)
        dq_blocks.append(torch.matmul(grad_scores, keys))
        dk_parts.append(torch.matmul(grad_scores.transpose(-1, -2), q_rows))
    return torch.cat(dq_blocks, dim=2), _sum_of_parts(dk_parts, t), _sum_of_parts(dv_parts, t)


def _sum_of_parts(parts: list[torch.Tensor], t: int) -> torch.Tensor:
    """Add up per-block gradients ``[B, H, n, D]`` that cover positions ``0:n`` of ``t``, in fp32."""
    total = sum(F.pad(part.float(), (0, 0, 0, t - part.shape[2])) for part in parts)
    return total.to(parts[0].dtype)


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        out, lse = _flash_forward(q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:  # noqa: ANN001
        return causal_attention_backward(*ctx.saved_tensors, grad_out)


def compute_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype attention runs in: autocast's where it is on (it casts SDPA's inputs), else the queries'."""
    device = q.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else q.dtype


def uses_blocked_backward(q: torch.Tensor, k: torch.Tensor, dropout: float) -> bool:
    """Whether ``causal_attention`` takes the blocked backward: compiled bf16 CPU training, no dropout, no GQA."""
    return (torch.compiler.is_compiling() and torch.is_grad_enabled() and q.device.type == "cpu"
            and compute_dtype(q) == torch.bfloat16 and not dropout and q.shape[1] == k.shape[1])


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
    """Causal attention of ``q, k, v [B, H, T, D]``: the blocked backward where it is faster, else PyTorch's SDPA."""
    if uses_blocked_backward(q, k, dropout):
        return _CausalAttention.apply(*(x.to(torch.bfloat16) for x in (q, k, v)))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout,
                                          enable_gqa=q.shape[1] != k.shape[1])
