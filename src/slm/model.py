"""The GPT-2 architecture: learned positions, pre-LayerNorm blocks, GELU(tanh) MLP, tied embeddings.

Layer names follow Hugging Face's GPT2LMHeadModel (``c_attn``, ``c_proj``, ``c_fc``, ``ln_1`` ...) so that
weights convert one-to-one; our linear layers store ``[out, in]`` where theirs (Conv1D) store ``[in, out]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slm.config import ModelConfig
from slm.kv_cache import KVCache


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.d_model, 3 * config.d_model)
        self.c_proj = nn.Linear(config.d_model, config.d_model)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, cache: KVCache | None, start: int | None,
                decode_mask: torch.Tensor | None) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).view(b, t, 3, self.n_head, c // self.n_head).permute(2, 0, 3, 1, 4)
        dropout = self.dropout if self.training else 0.0
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:
            k, v = cache.write(self.layer, k, v, start)
            if start is None:  # rows at different positions, one new token each
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=decode_mask)
            elif t == 1:  # one new token attends to everything before it
                y = F.scaled_dot_product_attention(q, k, v)
            elif start == 0:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:  # a chunk after a cached prefix: causal mask shifted by `start`
                rows = torch.arange(t, device=x.device)[:, None] + start
                mask = torch.arange(start + t, device=x.device)[None, :] <= rows
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = self.c_proj(y.transpose(1, 2).reshape(b, t, c))
        return F.dropout(y, dropout, self.training) if dropout else y


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, 4 * config.d_model)
        self.c_proj = nn.Linear(4 * config.d_model, config.d_model)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))
        return F.dropout(y, self.dropout, self.training) if self.dropout and self.training else y


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None, start: int | None,
                decode_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, start, decode_mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.context_length, config.d_model)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self._head_cache: tuple[tuple, torch.Tensor] | None = None
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) so the residual stream keeps its variance.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _head_weight_t(self) -> torch.Tensor:
        """A contiguous ``[d_model, vocab]`` copy of the tied embedding for inference.

        ``x @ W_t`` on a contiguous transposed copy is several times faster on CPU than ``F.linear`` on the
        tied ``[vocab, d_model]`` weight for the matrix-vector products of decoding. The copy is rebuilt
        whenever the weight changes (its storage or version counter moves).
        """
        w = self.wte.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._head_cache is None or self._head_cache[0] != key:
            self._head_cache = (key, w.detach().t().contiguous())
        return self._head_cache[1]

    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, T, vocab]`` for ``tokens [B, T]``; ``[B, vocab]`` at indices ``logits_at [B]`` if given.

        With ``cache``, the tokens continue each row's cached sequence: row ``b`` starts at position
        ``cache.lengths[b]``, its keys and values are written into the cache, and the lengths advance by T.
        """
        b, t = tokens.shape
        start, decode_mask = 0, None
        if cache is None:
            if t > self.config.context_length:
                raise ValueError(f"sequence of {t} tokens exceeds the context length {self.config.context_length}")
            pos = torch.arange(t, device=tokens.device)[None, :]
        else:
            start = cache.uniform_start()
            if start is None:  # rows at different positions (decode only): each at its own length
                end = int(cache.lengths.max()) + t
                pos = cache.lengths[:, None]
                decode_mask = cache.decode_mask()
            else:
                end = start + t
                pos = torch.arange(start, end, device=tokens.device)[None, :]
            if end > self.config.context_length:
                raise ValueError(f"position {end - 1} is past the context length {self.config.context_length}")
        x = self.wte(tokens) + self.wpe(pos)
        if self.training and self.config.dropout:
            x = F.dropout(x, self.config.dropout, True)
        for block in self.h:
            x = block(x, cache, start, decode_mask)
        if cache is not None:
            cache.advance(t)
        if logits_at is not None:
            x = x[torch.arange(b, device=x.device), logits_at]
        x = self.ln_f(x)
        if torch.is_grad_enabled():
            return F.linear(x, self.wte.weight)
        return x @ self._head_weight_t()
