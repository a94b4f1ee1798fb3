"""A static key/value cache: preallocated once, written in place, one write position per row."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer for a batch of sequences.

    Storage is ``[n_layer, batch, kv_heads, max_len, head_dim]`` for keys and for values. Row ``b`` holds the
    keys of its tokens at slots ``0 .. lengths[b] - 1``, and slot ``i`` is position ``i``; rows advance
    independently, so sequences of different lengths share one batch without padding on the left.
    A decode step writes one slot per row and never concatenates or reallocates.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_head: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_len: int | None = None) -> KVCache:
        cfg = model.config
        param = next(model.parameters())
        return cls(
            cfg.n_layer,
            batch_size,
            cfg.kv_heads,  # grouped-query attention caches only the key/value heads
            max_len or cfg.context_length,
            cfg.head_dim,
            dtype=param.dtype,
            device=param.device,
        )

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def rows(self, start: int, stop: int) -> KVCache:
        """A view of rows ``start:stop`` that shares storage with this cache (no copy)."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        view.lengths = self.lengths[start:stop]
        view.max_len = self.max_len
        return view

    def reset(self) -> None:
        self.lengths.zero_()

    def copy_row(self, src: int, dst: int) -> None:
        """Move a sequence from row ``src`` to row ``dst`` (used to keep active rows contiguous)."""
        n = int(self.lengths[src])
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n

    def uniform_start(self) -> int | None:
        """The shared write position when every row is at the same one, else None (one host sync)."""
        lengths = self.lengths.tolist()
        return lengths[0] if min(lengths) == max(lengths) else None

    def write(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values ``[B, H, T, D]``; return the keys and values to attend over.

        ``start`` is the rows' shared position (from :meth:`uniform_start`), or None when rows differ,
        which is allowed for one new token per row. The caller advances ``lengths`` via :meth:`advance`.
        """
        t = k.shape[2]
        if start is not None:
            end = start + t
            if end > self.max_len:
                raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
            self.k[layer, :, :, start:end] = k
            self.v[layer, :, :, start:end] = v
            return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
        if t != 1:
            raise ValueError("rows at different positions can only decode one token at a time")
        end = int(self.lengths.max()) + 1
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        rows = torch.arange(self.batch_size, device=k.device)
        self.k[layer, rows, :, self.lengths] = k[:, :, 0]
        self.v[layer, rows, :, self.lengths] = v[:, :, 0]
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def decode_mask(self) -> torch.Tensor:
        """Boolean mask ``[B, 1, 1, S]``: row b may attend slots ``0 .. lengths[b]`` (its new token included)."""
        end = int(self.lengths.max()) + 1
        slots = torch.arange(end, device=self.lengths.device)
        return (slots[None, :] <= self.lengths[:, None])[:, None, None, :]

    def advance(self, n: int) -> None:
        self.lengths += n
