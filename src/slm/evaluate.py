"""Loss, perplexity and bits per byte of a model on texts, with a sliding window over the full text."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from slm.data import DataError, list_files, read_documents
from slm.model import GPT
from slm.tokenizer import Tokenizer


@torch.inference_mode()
def score_tokens(model: GPT, ids: list[int], batch_size: int = 8, stride: int | None = None) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of ``ids[1:]`` given what precedes each, and the count.

    Windows of ``context`` tokens advance by ``stride``; each target is scored once, in the first window
    that reaches it, so every prediction after the first window sees at least ``context - stride`` tokens.
    """
    context = model.config.context_length
    stride = stride or max(1, context // 2)
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be in [1, {context}], got {stride}")
    windows: list[tuple[int, int]] = []  # (begin, first target offset within the window)
    scored = 0  # targets ids[1 .. scored] are done
    begin = 0
    while scored < len(ids) - 1:
        end = min(begin + context, len(ids) - 1)  # inputs ids[begin:end] predict ids[begin+1:end+1]
        windows.append((begin, scored - begin))
        scored = end
        begin += stride
    device = model.wte.weight.device
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        x = torch.zeros(len(chunk), context, dtype=torch.long)
        y = torch.full((len(chunk), context), -100, dtype=torch.long)  # -100: not scored
        for row, (b, first) in enumerate(chunk):
            inp = ids[b : b + context]
            tgt = ids[b + 1 : b + 1 + context][: len(inp)]
            inp = inp[: len(tgt)]
            x[row, : len(inp)] = torch.tensor(inp)
            y[row, first : len(tgt)] = torch.tensor(tgt[first:])
        logits = model(x.to(device)).float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), reduction="sum",
                                                 ignore_index=-100)
        total += float(loss)
        count += int((y != -100).sum())
    return total, count


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
