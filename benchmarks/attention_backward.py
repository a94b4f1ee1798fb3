"""Milliseconds for one layer's causal attention in bf16: PyTorch's flash kernels against the blocked ones.

    python benchmarks/attention_backward.py [--shape 8,4] [--blocks 64,128,256,512] [--json F]

``--shape B,H``: a batch of B sequences of 512 positions, H heads of 64 (8,4 is `cpu-7m`'s training batch,
16,6 `llama-16m`'s). Times PyTorch's flash attention forward and forward + backward (its backward is the
difference), then `slm.training_kernels.causal_attention_backward` at each QUERY_BLOCK, compiled (how training
runs it) and, at 128, uncompiled, and `causal_attention_forward` compiled at each QUERY_BLOCK, on the same
inputs, 2 threads, median of 5 rounds of 5 calls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import slm.training_kernels as kernels
from slm.cpu import cpu_info

T, D = 512, 64


def milliseconds(fn: Callable[[], object], rounds: int = 5, calls: int = 5) -> float:
    fn()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - started) / calls * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="8,4", help="batch,heads")
    parser.add_argument("--blocks", default="64,128,256,512")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    batch, heads = (int(n) for n in args.shape.split(","))
    q, k, v, grad_out = (torch.randn(batch, heads, T, D, dtype=torch.bfloat16) for _ in range(4))
    out, lse = kernels._flash_forward(q, k, v)

    def pytorch_forward_backward() -> None:
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        F.scaled_dot_product_attention(*leaves, is_causal=True).backward(grad_out)

    forward = milliseconds(lambda: kernels._flash_forward(q, k, v))
    figures = {"pytorch flash forward": forward,
               "pytorch flash backward": milliseconds(pytorch_forward_backward) - forward}
    figures["blocked 128, uncompiled"] = milliseconds(lambda: kernels.causal_attention_backward(q, k, v, out, lse,
                                                                                                grad_out, 128))
    for block in (int(b) for b in args.blocks.split(",")):
        compiled = torch.compile(kernels.causal_attention_backward, dynamic=False)
        figures[f"blocked {block}, compiled"] = milliseconds(
            lambda c=compiled, b=block: c(q, k, v, out, lse, grad_out, b))
        compiled = torch.compile(kernels.causal_attention_forward, dynamic=False)
        figures[f"blocked forward {block}, compiled"] = milliseconds(lambda c=compiled, b=block: c(q, k, v, b))
        torch.compiler.reset()
    info = cpu_info()
    print(f"{batch} x {heads} heads x {T} positions x {D}, bf16, on {info.model} ({info.threads} threads)\n")
    print("| kernel | ms a layer |\n|---|---|")
    for name, ms in figures.items():
        print(f"| {name} | {ms:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"shape": [batch, heads, T, D], "cpu": info.model, "ms": figures},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
