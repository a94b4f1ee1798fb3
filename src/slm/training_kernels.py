"""Two paths of compiled bf16 training on a CPU, rewritten because PyTorch's are slow there.

- Causal attention: PyTorch's CPU flash-attention backward takes about five times its forward in bf16, so at
  ``cpu-7m``'s width attention was a third of a training step (docs/training-on-cpu.md). The backward here
  recomputes the attention weights from the forward's log-sum-exp, one block of query rows at a time against
  only the keys those rows may see, as batched bf16 matrix products (AMX where the CPU has it). Where the CPU
  has no AMX, PyTorch's flash forward is slow too, and the forward is computed the same blocked way.
- The head and its cross-entropy: computed a chunk of tokens at a time with the gradients worked out in the
  same pass (softmax minus the one-hot target is the logits' gradient), so the fp32 log-probabilities of
  every token are never stored and read back.

Both rely on torch.compile to fuse the elementwise work between their matrix products; uncompiled that work
is many separate passes and slower than PyTorch's own kernels, so the model takes them only while
torch.compile traces it for bf16 CPU training (``compiled_bf16_cpu_training``), and only when training gave
the model a ``TrainingKernels`` that turns them on (``GPT.kernels``; ``for_cpu`` picks them for a CPU's features
once, when training starts). Nothing here reads the machine at import.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slm.config import IGNORE_INDEX

# Query rows an attention block computes, and tokens whose logits the loss takes at once: the fastest sizes
# measured (docs/training-on-cpu.md, benchmarks/step_time.py --kernels).
QUERY_BLOCK = 128
LOSS_CHUNK = 1024


@dataclass(frozen=True)
class TrainingKernels:
    """Which of these paths a compiled bf16 CPU training step takes: ``query_block`` rows a block of the
    attention backward (0: PyTorch's attention), ``loss_chunk`` tokens a chunk of the loss (0: PyTorch's
    cross-entropy), and ``blocked_forward``: the attention forward in the same blocks (else PyTorch's flash
    forward). The default takes none of them (inference, and any model training did not set up)."""

    query_block: int = 0
    loss_chunk: int = 0
    blocked_forward: bool = False

    @classmethod
    def for_cpu(cls, features: tuple[str, ...]) -> TrainingKernels:
        """Both paths; the forward blocked too where the CPU has no AMX: PyTorch's flash forward runs its
        products on AMX tiles and is slower than the blocked one without them (docs/training-on-cpu.md)."""
        return cls(QUERY_BLOCK, LOSS_CHUNK, blocked_forward="amx_tile" not in features)


PYTORCH_KERNELS = TrainingKernels()


def _flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's CPU flash attention (causal): the output and each query row's log-sum-exp of its scores."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
    return out, lse


def _block_scores(q_rows: torch.Tensor, keys: torch.Tensor, r0: int) -> torch.Tensor:
    """Scaled fp32 scores of query rows ``r0:`` against keys ``0:r1``, -inf where a key is after its row."""
    scores = torch.matmul(q_rows, keys.transpose(-1, -2)).float() * q_rows.shape[-1] ** -0.5
    future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q_rows.device).triu_(r0 + 1)
    return scores.masked_fill(future, float("-inf"))


def causal_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             block: int = QUERY_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal softmax attention of ``q, k, v [B, H, T, D]`` and each query row's log-sum-exp, ``block`` rows at
    a time against the keys those rows see: what ``_flash_forward`` returns, with the weights rounded to the
    inputs' dtype before their product with ``v`` (as the backward rounds them)."""
    t = q.shape[2]
    out_blocks, lse_blocks = [], []
    for r0 in range(0, t, block):
        r1 = min(t, r0 + block)
        scores = _block_scores(q[:, :, r0:r1], k[:, :, :r1], r0)
        lse = torch.logsumexp(scores, dim=-1)
        out_blocks.append(torch.matmul(torch.exp(scores - lse[..., None]).to(q.dtype), v[:, :, :r1]))
        lse_blocks.append(lse)
    return torch.cat(out_blocks, dim=2), torch.cat(lse_blocks, dim=2)


def causal_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                              lse: torch.Tensor, grad_out: torch.Tensor,
                              block: int = QUERY_BLOCK) -> tuple[torch.Tensor, ...]:
    """Gradients of causal softmax attention for ``q, k, v [B, H, T, D]``, rebuilt block by block from ``lse``.

    Each block of query rows ``r0:r1`` sees keys ``0:r1``: weights ``p = exp(q k^T * scale - lse)`` (zero above
    the diagonal), then ``dv += p^T do``, ``ds = p * (do v^T - rowsum(do * out)) * scale``, ``dq = ds k``,
    ``dk += ds^T q``. Products run in the inputs' dtype, the weights and the sums of the blocks' parts in fp32.
    The blocks' parts are gathered in lists rather than added into slices: torch.compile turns each slice
    update into a copy of the whole tensor.
    """
    scale = q.shape[-1] ** -0.5
    t = q.shape[2]
    q, k, v, grad_out = (x.contiguous() for x in (q, k, v, grad_out))  # one dense layout, whatever the caller gave
    delta = (grad_out.float() * out.float()).sum(-1, keepdim=True)  # rowsum(do * out): softmax's backward term
    dq_blocks, dk_parts, dv_parts = [], [], []
    for r0 in range(0, t, block):
        r1 = min(t, r0 + block)
        q_rows, grad_rows, keys, values = q[:, :, r0:r1], grad_out[:, :, r0:r1], k[:, :, :r1], v[:, :, :r1]
        weights = torch.exp(_block_scores(q_rows, keys, r0) - lse[:, :, r0:r1, None])  # 0 after each row
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
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,  # noqa: ANN001
                kernels: TrainingKernels) -> torch.Tensor:
        if kernels.blocked_forward:
            out, lse = causal_attention_forward(q, k, v, kernels.query_block)
        else:
            out, lse = _flash_forward(q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.block = kernels.query_block
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        return *causal_attention_backward(*ctx.saved_tensors, grad_out, ctx.block), None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matrix products run in: autocast's where it is on, else the tensor's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def compiled_bf16_cpu_training(x: torch.Tensor) -> bool:
    """Whether torch.compile is tracing a bf16 training step on a CPU: where the paths here are faster."""
    return (torch.compiler.is_compiling() and torch.is_grad_enabled() and x.device.type == "cpu"
            and compute_dtype(x) == torch.bfloat16)


def takes_blocked_attention(q: torch.Tensor, k: torch.Tensor, dropout: float, kernels: TrainingKernels) -> bool:
    """Whether ``causal_attention`` takes the blocked attention: turned on, no dropout, no shared key/value
    heads, in a compiled bf16 CPU training step."""
    return kernels.query_block > 0 and compiled_bf16_cpu_training(q) and not dropout and q.shape[1] == k.shape[1]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float = 0.0,
                     kernels: TrainingKernels = PYTORCH_KERNELS) -> torch.Tensor:
    """Causal attention of ``q, k, v [B, H, T, D]``: the blocked one where it is on and faster, else SDPA."""
    if takes_blocked_attention(q, k, dropout, kernels):
        return _CausalAttention.apply(*(x.to(torch.bfloat16) for x in (q, k, v)), kernels)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout,
                                          enable_gqa=q.shape[1] != k.shape[1])


def head_loss_and_gradients(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = LOSS_CHUNK,
                            grad_weight_wanted: bool = True) -> tuple[torch.Tensor, ...]:
    """Mean cross-entropy of the logits ``x @ weight.T`` (``x [N, C]``) against ``targets [N]`` (IGNORE_INDEX
    left out), with its gradients for ``x`` and (if wanted) ``weight``, ``chunk`` tokens at a time.

    Matrix products in ``x``'s dtype, the logits' softmax in fp32, the weight's gradient summed in fp32.
    """
    w = weight.to(x.dtype)
    counted = targets != IGNORE_INDEX
    count = counted.sum()
    losses, grad_x_chunks, grad_weight = [], [], torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
    for c0 in range(0, x.shape[0], chunk):
        x_chunk, chunk_targets = x[c0:c0 + chunk], targets[c0:c0 + chunk].clamp(min=0)
        weight_of_row = counted[c0:c0 + chunk, None] / count  # 1/count, or 0 for a left-out target
        logits = (x_chunk @ w.t()).float()
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        losses.append(((lse - logits.gather(1, chunk_targets[:, None])) * weight_of_row).sum())
        onehot = (torch.arange(logits.shape[1], device=x.device) == chunk_targets[:, None]).to(logits.dtype)
        grad_logits = ((torch.exp(logits - lse) - onehot) * weight_of_row).to(x.dtype)
        grad_x_chunks.append(grad_logits @ w)
        if grad_weight_wanted:
            grad_weight = grad_weight + (grad_logits.t() @ x_chunk).float()
    return torch.stack(losses).sum(), torch.cat(grad_x_chunks), grad_weight


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # noqa: ANN001
                chunk: int) -> torch.Tensor:
        loss, grad_x, grad_weight = head_loss_and_gradients(x, weight, targets, chunk, ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_x, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        grad_x, grad_weight = ctx.saved_tensors
        return grad_x * grad_loss, grad_weight * grad_loss, None, None


def head_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
              kernels: TrainingKernels = PYTORCH_KERNELS) -> torch.Tensor:
    """Mean cross-entropy of the logits ``x @ weight.T`` (``x [B, T, C]``) against ``targets [B, T]``, its
    softmax in fp32: chunked with its gradients in the same pass where that is on and faster, else PyTorch's."""
    if kernels.loss_chunk > 0 and compiled_bf16_cpu_training(x):
        return _HeadLoss.apply(x.flatten(0, 1).to(torch.bfloat16), weight, targets.flatten(), kernels.loss_chunk)
    return F.cross_entropy(F.linear(x, weight).float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
