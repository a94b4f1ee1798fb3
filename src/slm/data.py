"""Reading a prepared data directory for training: meta.json, the token files and loss masks (checked against
meta.json), the batch sampler (with --mix weights) and the fixed evaluation windows. slm.prepare writes them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from slm.config import IGNORE_INDEX
from slm.corpus import DataError


def load_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir)
    meta_path = path / "meta.json"
    if not path.is_dir():
        raise DataError(f"--data {path}: directory not found; create it with `slm prepare INPUT --out {path}`")
    if not meta_path.is_file() or not (path / "train.bin").is_file():
        raise DataError(f"--data {path}: not a prepared data directory (no meta.json/train.bin); "
                        f"run `slm prepare INPUT --out {path}` first")
    return json.loads(meta_path.read_text(encoding="utf-8"))


def open_mask(data_dir: str | Path, split: str) -> np.ndarray | None:
    """The split's loss mask (1 = a token to learn; 0 = an instruct header, or the end of a part cut from a
    longer story), if prepare wrote one."""
    path = Path(data_dir) / f"{split}.mask"
    return np.memmap(path, dtype=np.uint8, mode="r") if path.is_file() and path.stat().st_size else None


def open_tokens(data_dir: str | Path, split: str, meta: dict) -> np.ndarray:
    """A split's token file, checked against meta.json: its size, and ids inside the vocabulary."""
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file() or path.stat().st_size == 0:
        return np.zeros(0, dtype=meta["dtype"])
    dtype, size = np.dtype(meta["dtype"]), path.stat().st_size
    expected = meta.get(split, {}).get("tokens", size // dtype.itemsize) * dtype.itemsize
    if size != expected or size % dtype.itemsize:
        raise DataError(f"{path} has {size:,} bytes where meta.json records {expected // dtype.itemsize:,} "
                        f"{dtype.name} tokens ({expected:,} bytes): the file is cut short or damaged; run "
                        "`slm prepare` again")
    tokens = np.memmap(path, dtype=dtype, mode="r")
    if int(tokens.max()) >= meta["vocab_size"]:
        raise DataError(f"{path} holds token id {int(tokens.max()):,}, outside the vocabulary of "
                        f"{meta['vocab_size']:,} (meta.json): the file is damaged; run `slm prepare` again")
    return tokens


class BatchSampler:
    """Random windows of ``context + 1`` tokens; the RNG state is plain JSON so a run resumes exactly.

    Every rank draws the same *global* batch and takes its own slice, so N ranks with batch B see exactly
    the samples that one process with batch N*B sees.
    """

    def __init__(self, tokens: np.ndarray, context: int, seed: int,
                 mix: list[tuple[int, int, float]] | None = None, mask: np.ndarray | None = None) -> None:
        if len(tokens) < context + 2:
            raise DataError(f"only {len(tokens)} training tokens, fewer than one window of {context + 1}; "
                            "give more text or a smaller context")
        if mask is not None and len(mask) != len(tokens):
            raise DataError(f"the loss mask has {len(mask):,} entries for {len(tokens):,} tokens; prepare the data "
                            "again")
        self.tokens, self.mask = tokens, mask
        self.context = context
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.mix = None
        if mix:  # (start, end, weight) per input: a window comes from an input with p ~ weight x its tokens
            starts, ends, weights = (np.array(x, dtype=np.float64) for x in zip(*mix, strict=True))
            p = weights * (ends - starts)
            self.mix = (starts.astype(np.int64), ends.astype(np.int64), p / p.sum())

    def draw(self, global_batch: int) -> np.ndarray:
        """Start offsets of one global batch (all ranks draw the same ones)."""
        last = len(self.tokens) - self.context - 1
        if self.mix is None:
            return self.rng.integers(0, last, size=global_batch)
        starts, ends, p = self.mix
        picks = self.rng.choice(len(p), size=global_batch, p=p)
        low = np.minimum(starts[picks], last - 1)
        high = np.clip(ends[picks] - self.context - 1, low + 1, last)  # a short input: windows run past its end
        return self.rng.integers(low, high)

    def windows(self, offsets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets ``[len(offsets), context]`` for the given offsets; with a mask, the
        targets it leaves out are IGNORE_INDEX."""
        w = torch.from_numpy(np.stack([self.tokens[o : o + self.context + 1].astype(np.int64) for o in offsets]))
        x, y = w[:, :-1], w[:, 1:].clone()
        if self.mask is not None:
            keep = torch.from_numpy(np.stack([self.mask[o + 1 : o + self.context + 1] for o in offsets]))
            y[keep == 0] = IGNORE_INDEX
        return x, y

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state


def input_weights(meta: dict, spec: str) -> list[float]:
    """Parse ``--mix "simple-stories=3,fables=2"``: each name is the start of an input's file name; inputs not
    named keep weight 1. One weight per input of meta["sources"]."""
    sources = meta.get("sources")
    if not sources:
        raise DataError("--mix needs per-input token ranges in meta.json: prepare the data again with this slm")
    names = [Path(src["input"]).name for src in sources]
    weights = [1.0] * len(sources)
    for item in spec.split(","):
        key, sep, value = item.strip().partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not sep or not key or weight < 0:
            raise DataError(f"--mix {spec!r}: give NAME=WEIGHT pairs with weights >= 0, e.g. simple-stories=3,fables=2")
        matches = [i for i, name in enumerate(names) if name.startswith(key)]
        if not matches:
            raise DataError(f"--mix: no input file name starts with {key!r} (inputs: {', '.join(names)})")
        for i in matches:
            weights[i] = weight
    return weights


def mixture(meta: dict, spec: str) -> list[tuple[int, int, float]] | None:
    """(start, end, weight) of every input's training tokens under ``--mix`` (input_weights), or None for no mix."""
    if not spec:
        return None
    mix = [(src["train"][0], src["train"][1], w) for src, w in zip(meta["sources"], input_weights(meta, spec),
                                                                     strict=True) if src["train"][1] > src["train"][0]]
    if not any(w > 0 for _, _, w in mix):
        raise DataError(f"--mix {spec!r}: every input has weight 0")
    return mix


def trains_on_instruct(meta: dict, spec: str) -> bool:
    """Whether training on this data (with this --mix) sees instruct documents: they are in it, at a weight > 0."""
    instruct = set((meta.get("instruct") or {}).get("inputs", []))
    if not instruct:
        return False
    weights = input_weights(meta, spec) if spec else [1.0] * len(meta["sources"])
    return any(w > 0 for src, w in zip(meta["sources"], weights, strict=True) if src["input"] in instruct)


def fixed_windows(tokens: np.ndarray, context: int, n: int, seed: int = 1234) -> torch.Tensor:
    """A fixed set of ``n`` windows (same every evaluation), spread over the split."""
    if len(tokens) < context + 2:
        return torch.zeros(0, context + 1, dtype=torch.long)
    rng = np.random.Generator(np.random.PCG64(seed))
    offsets = rng.integers(0, len(tokens) - context - 1, size=n)
    return torch.from_numpy(np.stack([tokens[o : o + context + 1].astype(np.int64) for o in offsets]))
