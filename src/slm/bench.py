"""Decode-speed benchmark: our engine with the KV cache, without it, transformers' generate() and llama.cpp.

Batch 1, greedy, identical weights. Ours (native step, PyTorch step, native with fp16 weights, no cache) and
transformers are interleaved in one run and each figure is the median of ``repeats`` runs, so machine noise
hits them alike. llama.cpp (when ``make llama-cpp`` has built it)
runs after them on a GGUF export of the same weights, in f32 and f16: ``llama-bench -p 0 -n N``, the mean
of ``repeats`` runs.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from slm import native
from slm.config import ConfigError, get_preset
from slm.cpu import cpu_info
from slm.files import atomic_write, atomic_write_json
from slm.generation import DecodeStep, Engine, SamplingParams
from slm.kv_cache import KVCache
from slm.model import GPT
from slm.tokenizer import Tokenizer

PROMPT_TOKENS = 8
SCORE_TOKENS = 4096  # tokens of --text scored with fp32 and fp16 weights
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LABELS = {  # column -> what it measures (the plot's legend)
    "cached_tok_s": "slm, KV cache (native step)",
    "torch_cached_tok_s": "slm, KV cache (PyTorch step)",
    "native_fp16_tok_s": "slm, KV cache, fp16 weights",
    "uncached_tok_s": "slm, no cache",
    "hf_cached_tok_s": "transformers generate (cache)",
    "llama_cpp_f32_tok_s": "llama.cpp f32",
    "llama_cpp_f16_tok_s": "llama.cpp f16",
}


def cpu_line() -> str:
    info = cpu_info()
    return f"{info.model} ({' '.join(info.features)})"


def decode(model: GPT, prompt: list[int], n: int, use_cache: bool, decode_step: DecodeStep = "auto",
           decode_weights: str = "fp32") -> tuple[float, list[int]]:
    engine = Engine(model, None, max_batch=1, use_cache=use_cache, decode_step=decode_step,
                    decode_weights=decode_weights)
    seq = engine.add(prompt, SamplingParams(max_new_tokens=n, temperature=0, stop_at_eot=False))
    start = time.perf_counter()
    engine.finish([seq])
    return time.perf_counter() - start, seq.generated


@torch.inference_mode()
def decode_hf(hf, prompt: list[int], n: int) -> tuple[float, list[int]]:
    ids = torch.tensor([prompt])
    start = time.perf_counter()
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                      do_sample=False, use_cache=True, pad_token_id=0)
    return time.perf_counter() - start, out[0, len(prompt) :].tolist()


def load_bench_model(model: str | None, preset: str, longest: int) -> tuple[GPT, Tokenizer | None, str]:
    if model:
        from slm.checkpoint import load

        m, tokenizer = load(model)
        return m, tokenizer, f"checkpoint {model}"
    # Random weights: give the shape room for the longest run, so every length decodes without a window
    # shift and transformers (which cannot go past its positions) can run at every length too.
    shape = get_preset(preset).config
    cfg = dataclasses.replace(shape, context_length=max(shape.context_length, PROMPT_TOKENS + longest), dropout=0.0)
    torch.manual_seed(0)
    return GPT(cfg).eval(), None, f"random weights, {preset} shape (context {cfg.context_length})"


def contenders(net: GPT, dtype: str, prompt: list[int], hf: bool) -> dict:
    """name -> fn(n) giving (seconds, tokens): the decoders timed side by side."""
    fast = net if dtype == "fp32" else copy.deepcopy(net).to(DTYPES[dtype])
    impls = {"cached": lambda n: decode(fast, prompt, n, True)}
    if native.available(fast):  # the default cached step is native: time PyTorch's beside it
        impls["torch_cached"] = lambda n: decode(fast, prompt, n, True, decode_step="torch")
        impls["native_fp16"] = lambda n: decode(fast, prompt, n, True, decode_weights="fp16")
    impls["uncached"] = lambda n: decode(fast, prompt, n, False)
    if hf:
        from slm.export import to_hf_model

        hf_model = to_hf_model(net)
        impls["hf_cached"] = lambda n: decode_hf(hf_model, prompt, n)
    return impls


def time_interleaved(impls: dict, lengths: list[int], repeats: int, context: int) -> tuple[dict, dict]:
    """Seconds per run and the tokens produced, for every decoder and length; decoders take turns."""
    for fn in impls.values():  # warm-up: first calls pay for allocations, lazy initialisation, compiling
        fn(8)
    times: dict[str, dict[int, list[float]]] = {k: {n: [] for n in lengths} for k in impls}
    tokens: dict[str, dict[int, list[int]]] = {k: {} for k in impls}
    for _ in range(repeats):
        for n in lengths:
            for name, fn in impls.items():
                if name == "hf_cached" and PROMPT_TOKENS + n > context:
                    continue  # past its learned positions transformers cannot continue
                seconds, out = fn(n)
                times[name][n].append(seconds)
                tokens[name][n] = out
    return times, tokens


def llama_cpp_speeds(net: GPT, tokenizer: Tokenizer | None, lengths: list[int], threads: int,
                     repeats: int) -> dict[str, dict[int, float]]:
    """llama.cpp's decode speed on the same weights, exported to GGUF in f32 and in f16."""
    from slm import llama_cpp
    from slm.gguf_export import export_gguf

    # Random weights have no tokenizer; llama.cpp needs one to load the file, and any byte-level one will do
    # for llama-bench, which decodes token ids without text.
    tokenizer = tokenizer or Tokenizer.train(["a small text for a placeholder vocabulary"], vocab_size=300)
    speeds: dict[str, dict[int, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("f32", "f16"):
            path = export_gguf(net, tokenizer, Path(tmp) / f"model-{dtype}.gguf", dtype)
            speeds[f"llama_cpp_{dtype}"] = {n: round(llama_cpp.decode_speed(path, n, threads, repeats), 1)
                                            for n in lengths}
    return speeds


@torch.inference_mode()
def stepwise_nll(model: GPT, tokens: list[int], decode_weights: str) -> float:
    """Summed negative log-likelihood (nats) of ``tokens[1:]``, each predicted by one native decode step from
    the tokens before it (windows of the context length, the cache restarting at each)."""
    step = native.decoder_for(model, decode_weights)
    cache = KVCache.for_model(model, 1)
    total, context = 0.0, model.config.context_length
    for start in range(0, len(tokens) - 1, context):
        cache.reset()
        window = torch.tensor(tokens[start : start + context + 1])
        for i in range(len(window) - 1):
            logits = step.step(window[i : i + 1], cache)[0]
            total -= float(torch.log_softmax(logits, -1)[window[i + 1]])
    return total


def fp16_quality(net: GPT, tokenizer: Tokenizer | None, text: str | None, greedy: list[int]) -> dict:
    """How far the fp16 weights move the model: bits per byte of ``text`` (or bits per token of the fp32
    greedy tokens, without a text or tokenizer), fp16 minus fp32, through the same native step."""
    if text is not None and tokenizer is not None:
        tokens = tokenizer.encode(text)[:SCORE_TOKENS]
        unit, per = "bits_per_byte", len(tokenizer.decode(tokens).encode("utf-8"))
    else:
        tokens, unit = greedy, "bits_per_token"
        per = len(tokens) - 1
    bits = {w: stepwise_nll(net, tokens, w) / math.log(2) / per for w in native.WEIGHTS}
    return {"scored_tokens": len(tokens), f"fp32_{unit}": round(bits["fp32"], 5),
            f"fp16_{unit}": round(bits["fp16"], 5), f"fp16_delta_{unit}": round(bits["fp16"] - bits["fp32"], 5)}


def table_rows(lengths: list[int], times: dict, tokens: dict, external: dict, reference: dict,
               dtype: str) -> list[dict]:
    rows = []
    for n in lengths:
        row: dict = {"new_tokens": n}
        for name in times:
            t = times[name][n]
            row[f"{name}_tok_s"] = round(n / statistics.median(t), 1) if t else None
        for name, speeds in external.items():
            row[f"{name}_tok_s"] = speeds[n]
        row["cache_equals_uncached"] = tokens["cached"][n] == tokens["uncached"][n]
        if "torch_cached" in tokens:
            row["native_equals_torch"] = tokens["cached"][n] == tokens["torch_cached"][n]
            row["fp16_matches_fp32"] = tokens["native_fp16"][n] == reference[n]
        if dtype != "fp32":
            row["matches_fp32"] = tokens["cached"][n] == reference[n]
        if "hf_cached" in tokens and n in tokens["hf_cached"]:
            row["matches_hf"] = tokens["hf_cached"][n] == reference[n]
        rows.append(row)
    return rows


def run_bench(model: str | None, preset: str, lengths: list[int], repeats: int = 3, threads: int | None = None,
              json_path: str | None = None, plot_path: str | None = None, hf: bool = True,
              dtype: str = "fp32", llama_cpp: bool | None = None, text: str | None = None) -> dict:
    """``llama_cpp``: add llama.cpp's columns (None: when its tools are built). ``text``: what the fp16
    weights' bits-per-byte change is measured on (else the fp32 greedy tokens, in bits per token)."""
    if not lengths or min(lengths) <= 0:
        raise ConfigError("--lengths must be positive integers, e.g. 64,128,512")
    if repeats < 1:
        raise ConfigError("--repeats must be at least 1")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}")
    if threads:
        torch.set_num_threads(threads)
    lengths = sorted(lengths)
    net, tokenizer, what = load_bench_model(model, preset, lengths[-1])
    prompt = torch.randint(0, net.config.vocab_size, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(1))
    prompt = prompt.tolist()
    impls = contenders(net, dtype, prompt, hf)
    times, tokens = time_interleaved(impls, lengths, repeats, net.config.context_length)
    reference = {n: decode(net, prompt, n, True)[1] for n in lengths} if dtype != "fp32" else tokens["cached"]
    if llama_cpp is None:
        from slm import llama_cpp as tools

        llama_cpp = tools.available()
    external = llama_cpp_speeds(net, tokenizer, lengths, torch.get_num_threads(), repeats) if llama_cpp else {}
    rows = table_rows(lengths, times, tokens, external, reference, dtype)
    longest = rows[-1]
    with_hf = [r for r in rows if r.get("hf_cached_tok_s")]
    result = {
        "model": what,
        "parameters": net.num_parameters(),
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "cpu": cpu_line(),  # the kind of CPU a figure was measured on: every figure written down names it
        "prompt_tokens": PROMPT_TOKENS,
        "repeats": repeats,
        "rows": rows,
        "kv_speedup_max": round(longest["cached_tok_s"] / longest["uncached_tok_s"], 2),
        "speedup_vs_hf": round(with_hf[-1]["cached_tok_s"] / with_hf[-1]["hf_cached_tok_s"], 2) if with_hf else None,
        "speedup_vs_hf_at": with_hf[-1]["new_tokens"] if with_hf else None,
    }
    if "torch_cached" in impls:
        result["fp16_weights"] = fp16_quality(net, tokenizer, text, prompt + reference[lengths[-1]])
    print_table(result)
    if json_path:
        atomic_write_json(Path(json_path), result)
    if plot_path:
        plot(result, Path(plot_path))
    return result


def print_table(result: dict) -> None:
    print(f"{result['model']} | {result['parameters']:,} parameters | {result['dtype']} | "
          f"{result['threads']} threads | median of {result['repeats']} | {result['cpu']}")
    cols = [k for k in result["rows"][0] if k != "new_tokens"]
    print(f"{'new tokens':>10} " + " ".join(f"{c:>22}" for c in cols))
    for row in result["rows"]:
        print(f"{row['new_tokens']:>10} " + " ".join(f"{str(row.get(c)):>22}" for c in cols))
    if "fp16_weights" in result:
        print("fp16 weights vs fp32 (native step):", result["fp16_weights"])
    print(f"kv_speedup_max (cached / uncached at {result['rows'][-1]['new_tokens']}): {result['kv_speedup_max']}")
    if result["speedup_vs_hf"] is not None:
        print(f"speedup_vs_hf (ours cached / transformers cached at {result['speedup_vs_hf_at']}): "
              f"{result['speedup_vs_hf']}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for key, label in LABELS.items():
        pts = [(r["new_tokens"], r[key]) for r in rows if r.get(key)]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("new tokens (batch 1, greedy)")
    ax.set_ylabel("tokens / second")
    ax.set_title(f"{result['model']}\n{result['parameters'] / 1e6:.1f}M params, {result['dtype']}, "
                 f"{result['threads']} threads", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


