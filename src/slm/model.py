"""Two decoder-only families in one model: GPT-2 and llama. Pre-norm blocks and tied embeddings in both.

- gpt2: learned positions, LayerNorm, GELU(tanh) MLP, biases.
- llama: rotary positions (applied to queries and keys), RMSNorm, SwiGLU MLP, no biases, and grouped-query
  attention (``n_kv_head`` key/value heads shared by ``n_head`` query heads, which shrinks the KV cache).

Both share the attention and KV-cache path; what differs are the small pieces chosen in ``Block`` and ``GPT``.
Layer names follow Hugging Face's GPT2LMHeadModel (``c_attn``, ``c_proj``, ``c_fc``, ``ln_1`` ...); llama
keeps the same names with fused matrices (q|k|v in ``c_attn``, gate|up in ``c_fc``), split on export
(slm/export.py). Our linear layers store ``[out, in]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slm.config import ModelConfig
from slm.kv_cache import KVCache
from slm.training_kernels import PYTORCH_KERNELS, TrainingKernels, causal_attention, head_loss


def rotary_tables(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin ``[context, head_dim]`` for every position, in Hugging Face's half-split layout.

    The sin table's first half is negated, so that rotating is ``x * cos + swap_halves(x) * sin``: the same
    numbers as HF's ``x * cos + rotate_half(x) * sin`` (a sign moved from x to sin is exact), in fewer
    operators, which matters for one-token decode steps."""
    half = config.head_dim // 2
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(half, dtype=torch.float32) / half)
    angles = torch.outer(torch.arange(config.context_length, dtype=torch.float32), inv_freq)
    sin = angles.sin()
    return torch.cat((angles, angles), dim=-1).cos(), torch.cat((-sin, sin), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, H, T, D]`` by its positions' angles (``cos``/``sin`` broadcast as ``[B|1, 1, T, D]``)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((x2, x1), dim=-1) * sin


@dataclass(frozen=True)
class Attend:
    """What every block's attention needs in one forward pass, worked out once by ``GPT.attend``.

    ``start``: where the new tokens go in the cache (None: each row at its own length, one token each).
    ``causal``: SDPA's own causal mask (no cached prefix); else ``mask`` (True = may attend) or, for one new
    token that sees everything before it, no mask at all. ``rotary``: cos/sin of the tokens' positions (llama).
    ``kernels``: the training paths the model was given (``GPT.kernels``).
    """

    start: int | None
    causal: bool
    mask: torch.Tensor | None
    rotary: tuple[torch.Tensor, torch.Tensor] | None
    kernels: TrainingKernels


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        bias = config.arch == "gpt2"
        self.c_attn = nn.Linear(config.d_model, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=bias)
        self.c_proj = nn.Linear(config.d_model, config.d_model, bias=bias)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, cache: KVCache | None, attend: Attend) -> torch.Tensor:
        b, t, c = x.shape
        qkv = self.c_attn(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        qk_heads = self.n_head + self.n_kv_head
        if attend.rotary is None:
            q, k, v = qkv.split([self.n_head, self.n_kv_head, self.n_kv_head], dim=1)
        else:  # queries and keys rotated in one go
            q, k = apply_rotary(qkv[:, :qk_heads], *attend.rotary).split([self.n_head, self.n_kv_head], dim=1)
            v = qkv[:, qk_heads:]
        if cache is not None:
            k, v = cache.write(self.layer, k, v, attend.start)
        dropout = self.dropout if self.training else 0.0
        if attend.causal:
            y = causal_attention(q, k, v, dropout, attend.kernels)
        else:
            gqa = {"enable_gqa": True} if self.n_kv_head != self.n_head else {}
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attend.mask, dropout_p=dropout, **gqa)
        y = self.c_proj(y.transpose(1, 2).reshape(b, t, c))
        return F.dropout(y, dropout, self.training) if dropout else y


class MLP(nn.Module):
    """GPT-2: GELU(tanh) between two matrices (SwiGLU is its llama sibling)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, config.hidden)
        self.c_proj = nn.Linear(config.hidden, config.d_model)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))
        return F.dropout(y, self.dropout, self.training) if self.dropout and self.training else y


class SwiGLU(nn.Module):
    """llama: silu(gate) * up, then down. Gate and up are one fused matrix ``c_fc`` (one matmul, not two)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, 2 * config.hidden, bias=False)
        self.c_proj = nn.Linear(config.hidden, config.d_model, bias=False)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        y = self.c_proj(F.silu(gate) * up)
        return F.dropout(y, self.dropout, self.training) if self.dropout and self.training else y


def norm_layer(config: ModelConfig) -> nn.Module:
    if config.arch == "llama":
        return nn.RMSNorm(config.d_model, eps=config.layer_norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = norm_layer(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = norm_layer(config)
        self.mlp = SwiGLU(config) if config.arch == "llama" else MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None, attend: Attend) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, attend)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        if config.arch == "gpt2":
            self.wpe = nn.Embedding(config.context_length, config.d_model)
        else:  # rotary tables: derived from the config, so not saved with the weights
            cos, sin = rotary_tables(config)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = norm_layer(config)
        self._head_cache: tuple[tuple, torch.Tensor] | None = None
        # slm's own paths for compiled bf16 CPU training: off unless training turns them on (slm.training_kernels)
        self.kernels = PYTORCH_KERNELS
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) so the residual stream keeps its variance.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _head_weight_t(self) -> torch.Tensor:
        """A contiguous ``[d_model, vocab]`` copy of the tied embedding for inference.

        ``x @ W_t`` on a contiguous transposed copy is several times faster on CPU than ``F.linear`` on the
        tied ``[vocab, d_model]`` weight for the matrix-vector products of decoding. The copy is rebuilt
        whenever the weight changes (its storage or version counter moves). A model made or loaded inside
        ``torch.inference_mode()`` has inference tensors, which keep no version counter: those get the plain
        ``F.linear`` (a change to them could not be seen, so nothing of them is cached).
        """
        w = self.wte.weight
        if w.is_inference():
            return w.t()
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._head_cache is None or self._head_cache[0] != key:
            self._head_cache = (key, w.detach().t().contiguous())
        return self._head_cache[1]

    def embed(self, tokens: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
        """Token embeddings, plus learned positions (gpt2) or the rotary angles of ``pos [1|B, T]`` (llama)."""
        if self.config.arch == "gpt2":
            return self.wte(tokens) + self.wpe(pos), None
        return self.wte(tokens), (self.rope_cos[pos][:, None], self.rope_sin[pos][:, None])

    def positions(self, t: int, cache: KVCache | None) -> tuple[torch.Tensor, int | None]:
        """Positions ``[1|B, T]`` of the new tokens and the cache's shared start (None: rows differ)."""
        device = self.wte.weight.device
        start = 0 if cache is None else cache.uniform_start()
        if start is None:  # rows at different positions (decode only): each at its own length
            pos, end = cache.lengths[:, None], int(cache.lengths.max()) + t
        else:
            pos, end = torch.arange(start, start + t, device=device)[None, :], start + t
        if end > self.config.context_length:
            what = f"sequence of {t} tokens exceeds" if cache is None else f"position {end - 1} is past"
            raise ValueError(f"{what} the context length {self.config.context_length}")
        return pos, start

    @staticmethod
    def attention_mask(t: int, cache: KVCache | None, start: int | None) -> tuple[bool, torch.Tensor | None]:
        """(causal, mask) for SDPA. Each case keeps the cheapest form, because SDPA's fast kernels take
        ``is_causal`` or no mask but not an explicit one: training and a first chunk are causal; one new token
        sees everything cached; only rows at different lengths, or a chunk after a cached prefix, need a mask."""
        if cache is None or start == 0:
            return t > 1, None
        if start is None:
            return False, cache.decode_mask()
        if t == 1:
            return False, None
        rows = torch.arange(t, device=cache.lengths.device)[:, None] + start  # causal, shifted by `start`
        return False, torch.arange(start + t, device=cache.lengths.device)[None, :] <= rows

    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache | None = None,
        logits_at: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, T, vocab]`` for ``tokens [B, T]``; ``[B, vocab]`` at indices ``logits_at [B]`` if given;
        with ``targets [B, T]``, the mean cross-entropy over them instead (targets of -100 left out).

        With ``cache``, the tokens continue each row's cached sequence: row ``b`` starts at position
        ``cache.lengths[b]``, its keys and values are written into the cache, and the lengths advance by T.
        """
        b, t = tokens.shape
        pos, start = self.positions(t, cache)
        x, rotary = self.embed(tokens, pos)
        attend = Attend(start, *self.attention_mask(t, cache, start), rotary, self.kernels)
        if self.training and self.config.dropout:
            x = F.dropout(x, self.config.dropout, True)
        for block in self.h:
            x = block(x, cache, attend)
        if cache is not None:
            cache.advance(t)
        if logits_at is not None:
            x = x[torch.arange(b, device=x.device), logits_at]
        x = self.ln_f(x)
        if targets is not None:  # the loss in here, so that torch.compile fuses it with the head (in fp32)
            return head_loss(x, self.wte.weight, targets, self.kernels)
        if torch.is_grad_enabled():  # training (or any caller that wants gradients): through the tied weight
            return F.linear(x, self.wte.weight)
        return x @ self._head_weight_t()  # inference: a cached transposed copy, faster for decode steps
