"""Loss, perplexity and bits per byte of a model on texts, with a sliding window over the full text."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from slm.corpus import DataError, list_files, read_documents
from slm.model import GPT
from slm.tokenizer import Tokenizer


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int]]:
    """(begin, first scored offset) of each window over ``n_tokens`` ids; each target is scored once, in the
    first window that reaches it, so every prediction after the first window sees >= ``context - stride``
    tokens."""
    if not 1 <= stride <= context:
        raise DataError(f"stride must be in [1, {context}], got {stride}")
    windows: list[tuple[int, int]] = []
    scored = 0  # targets ids[1 .. scored] are done
    begin = 0
    while scored < n_tokens - 1:
        end = min(begin + context, n_tokens - 1)  # inputs ids[begin:end] predict ids[begin+1:end+1]
        windows.append((begin, scored - begin))
        scored = end
        begin += stride
    return windows


@dataclass
class TokenScores:
    """Log-probabilities (nats) of ``ids[1:]``, each given what precedes it, and optionally each position's
    ``top_n`` most likely tokens as (ids, log-probabilities), most likely first."""

    logprobs: list[float]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]

    def extend(self, other: TokenScores) -> None:
        self.logprobs += other.logprobs
        self.top_ids += other.top_ids
        self.top_logprobs += other.top_logprobs


@torch.inference_mode()
def score_batches(model: GPT, ids: list[int], top_n: int = 0, batch_size: int = 8,
                  stride: int | None = None) -> Iterator[TokenScores]:
    """The scores of :func:`score_token_logprobs` one batch of windows at a time, in order, so a caller
    (the server's worker) can interleave other work, check a deadline or stop between batches."""
    context = model.config.context_length
    windows = sliding_windows(len(ids), context, stride or max(1, context // 2))
    device = model.wte.weight.device
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        x = torch.zeros(len(chunk), context, dtype=torch.long)
        for row, (b, _) in enumerate(chunk):
            inp = ids[b : min(b + context, len(ids) - 1)]
            x[row, : len(inp)] = torch.tensor(inp)
        logprobs = torch.log_softmax(model(x.to(device)).float(), dim=-1)
        part = TokenScores([], [], [])
        for row, (b, first) in enumerate(chunk):
            n = min(context, len(ids) - 1 - b)  # targets ids[b+1 : b+1+n]
            rows = logprobs[row, first:n]
            targets = torch.tensor(ids[b + 1 + first : b + 1 + n], device=rows.device)
            part.logprobs += rows.gather(1, targets[:, None])[:, 0].tolist()
            if top_n:
                top = rows.topk(top_n, dim=-1)
                part.top_ids += top.indices.tolist()
                part.top_logprobs += top.values.tolist()
        yield part


def score_token_logprobs(model: GPT, ids: list[int], top_n: int = 0, batch_size: int = 8,
                         stride: int | None = None) -> TokenScores:
    """The model's log-probability of every token after the first, with a sliding window past the context
    (the forward pass of `slm eval` and of the server's ``logprobs``/``echo``)."""
    scores = TokenScores([], [], [])
    for part in score_batches(model, ids, top_n, batch_size, stride):
        scores.extend(part)
    return scores


def score_tokens(model: GPT, ids: list[int], batch_size: int = 8, stride: int | None = None) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of ``ids[1:]`` given what precedes each, and the count."""
    logprobs = score_token_logprobs(model, ids, 0, batch_size, stride).logprobs
    return -math.fsum(logprobs), len(logprobs)


def metrics(name: str, nll: float, tokens: int, n_bytes: int) -> dict:
    loss = nll / tokens if tokens else float("nan")
    return {"name": name, "tokens": tokens, "bytes": n_bytes, "loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": nll / math.log(2) / n_bytes if n_bytes else float("nan")}


def evaluate_text(model: GPT, tokenizer: Tokenizer, documents: list[str], name: str = "text",
                  batch_size: int = 8, stride: int | None = None) -> dict:
    """Score documents joined by <|endoftext|>, starting after one (so the first token is predicted too)."""
    ids = [tokenizer.eot_id]
    for doc in documents:
        ids += tokenizer.encode(doc) + [tokenizer.eot_id]
    ids = ids[:-1]
    nll, count = score_tokens(model, ids, batch_size, stride)
    return metrics(name, nll, count, sum(len(d.encode("utf-8")) for d in documents))


def evaluate_files(model: GPT, tokenizer: Tokenizer, paths: list[str | Path], batch_size: int = 8,
                   stride: int | None = None) -> dict:
    model.eval()
    results = []
    for path in list_files(paths):
        docs = [d for d in read_documents(path) if d.strip()]
        if not docs:
            raise DataError(f"{path}: no text to evaluate")
        results.append(evaluate_text(model, tokenizer, docs, str(path), batch_size, stride))
    nll = sum(r["loss"] * r["tokens"] for r in results)
    total = metrics("total", nll, sum(r["tokens"] for r in results), sum(r["bytes"] for r in results))
    return {"files": results, "total": total}
