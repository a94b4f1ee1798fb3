"""Where a one-token decode step spends its time: PyTorch's step under the profiler, and the native step.

    python benchmarks/decode_profile.py [--model default] [--tokens 128] [--json benchmarks/decode-profile.json]

Prints the PyTorch step's operators by self CPU time (how many per token, how much of the step is matrix
products), then milliseconds per token for the PyTorch step and for the native step (fp32, fp16 weights)
at 1 and 2 threads, all on the same prompt and greedy tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from slm.checkpoint import load
from slm.generation import Engine, SamplingParams

MATMUL_OPS = ("aten::addmm", "aten::mm", "aten::matmul", "aten::linear", "aten::bmm")


def run(model, prompt: list[int], n: int, native: bool, weights: str = "fp32") -> tuple[float, list[int]]:
    engine = Engine(model, None, max_batch=1, decode_step="native" if native else "torch", decode_weights=weights)
    seq = engine.add(prompt, SamplingParams(max_new_tokens=n, temperature=0, stop_at_eot=False))
    steps = engine.run([seq])
    next(steps)  # the prefill and first token: not part of the per-token figure
    start = time.perf_counter()
    for _ in steps:
        pass
    return (time.perf_counter() - start) / (n - 1) * 1000, seq.generated


def profile_torch_step(model, prompt: list[int], n: int) -> dict:
    run(model, prompt, 8, native=False)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(model, prompt, n, native=False)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    ops = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    top = [{"op": e.key, "calls_per_token": round(e.count / n, 1), "us_per_token": round(e.self_cpu_time_total / n, 1),
            "share": round(e.self_cpu_time_total / total, 3)} for e in ops[:12]]
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    calls = sum(e.count for e in events if e.key.startswith("aten::"))
    return {"aten_calls_per_token": round(calls / n), "matmul_share": round(matmul / total, 3),
            "profiled_us_per_token": round(total / n), "top_ops": top}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    model, tokenizer = load(args.model)
    prompt = tokenizer.encode("Once upon a time")
    report: dict = {"model": args.model, "parameters": model.num_parameters(), "tokens": args.tokens}
    torch.set_num_threads(2)
    report["torch_profile"] = prof = profile_torch_step(model, prompt, args.tokens)
    print(f"PyTorch step: {prof['aten_calls_per_token']} aten calls per token, matrix products "
          f"{prof['matmul_share']:.0%} of the profiled time")
    for op in prof["top_ops"]:
        print(f"  {op['op']:<36} {op['calls_per_token']:>6} calls/token {op['us_per_token']:>8} us/token "
              f"{op['share']:>6.1%}")
    variants = {"torch": (False, "fp32"), "native": (True, "fp32"), "native_fp16": (True, "fp16")}
    timings: dict = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        samples: dict[str, list[float]] = {k: [] for k in variants}
        tokens: dict[str, list[int]] = {}
        for _ in range(args.repeats):  # interleaved, so machine noise hits all alike
            for name, (native, weights) in variants.items():
                ms, tokens[name] = run(model, prompt, args.tokens, native, weights)
                samples[name].append(ms)
        timings[threads] = {name: round(statistics.median(v), 3) for name, v in samples.items()}
        timings[threads]["native_equals_torch"] = tokens["native"] == tokens["torch"]
        timings[threads]["fp16_equals_fp32"] = tokens["native_fp16"] == tokens["native"]
        print(f"{threads} thread(s), ms per token (median of {args.repeats}): " + ", ".join(
            f"{k} {v}" for k, v in timings[threads].items()))
    report["ms_per_token"] = timings
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
