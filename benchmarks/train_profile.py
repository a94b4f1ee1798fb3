"""Where a training step's time goes on this CPU: torch.profiler over the real `Trainer.train_step`.

    python benchmarks/train_profile.py --data runs/v4/data [--preset cpu-7m] [--dtype bf16] [--compile] [--steps 4]
        [--kernels] [--shapes]

Builds the run `slm train --preset P --dtype D [--compile]` would (its recipe, 2 threads, a scratch --out), takes
two warm-up steps (compiling, with --compile), profiles ``--steps`` more and prints the operators by self CPU
time, grouped into matrix products, attention, the loss, casts and copies, torch.compile's fused kernels,
elementwise work and the rest, with the step's mean wall time. --kernels lists each kernel of the compiled graphs
on its own (inductor's kernel profile) instead of one line a graph; --shapes adds the matrix products by shape,
with the TFLOP/s each shape runs at.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch._inductor.config
from torch.profiler import ProfilerActivity, profile

from slm.cpu import cpu_info
from slm.memory import keep_freed_memory
from slm.train import Trainer
from slm.train_config import TrainConfig, settings_under_flags

# Operator name fragments -> group; the first that matches wins (so "_flash_attention" is attention, not "mm").
GROUPS = (("fused kernels (torch.compile)", ("CompiledFxGraph", "cpp_fused")), ("attention", ("attention", "sdpa")),
          ("loss", ("log_softmax", "nll_loss", "cross_entropy")),
          ("matrix products", ("mm", "addmm", "bmm", "linear", "matmul")),
          ("casts and copies", ("copy_", "to_copy", "_to", "clone", "contiguous")),
          ("fill and zero", ("fill_", "zero_")))


def group_of(name: str) -> str:
    for group, fragments in GROUPS:
        if any(f in name for f in fragments):
            return group
    return "elementwise and the rest"


def build(data: Path, out: Path, preset: str, dtype: str, compile_model: bool = False) -> Trainer:
    """The run `slm train --preset P --dtype D [--compile] --threads 2` would make, in a scratch ``out``, in a
    process whose malloc keeps freed memory as `slm train`'s does."""
    keep_freed_memory()
    values = {"preset": preset, "dtype": dtype, "threads": 2, "compile": compile_model}
    cfg = TrainConfig(**{**settings_under_flags(values), **values})
    torch.set_num_threads(cfg.threads)
    return Trainer(data, out, cfg, {}, resume=False, progress=False, device=torch.device("cpu"), rank=0, world=1)


def product_flops(name: str, shapes: list) -> int:
    """Floating-point operations of one matrix product from its profiled input shapes (0 if not one)."""
    if name == "aten::mm":
        (m, k), (_, n) = shapes[0], shapes[1]
        return 2 * m * k * n
    if name in ("aten::bmm", "aten::baddbmm"):
        (b, m, k), (_, _, n) = shapes[-4:-2] if name == "aten::baddbmm" else shapes[:2]
        return 2 * b * m * k * n
    return 0


def print_product_shapes(prof: profile, steps: int) -> None:
    rows = [(e.key, e.input_shapes, e.self_cpu_time_total / 1e6 / steps, e.count / steps)
            for e in prof.key_averages(group_by_input_shape=True) if product_flops(e.key, e.input_shapes)]
    print("\n| product | input shapes | calls a step | s a step | TFLOP/s |\n|---|---|---|---|---|")
    for name, shapes, seconds, calls in sorted(rows, key=lambda r: -r[2])[:16]:
        tflops = product_flops(name, shapes) * calls / seconds / 1e12
        print(f"| `{name}` | {shapes} | {calls:g} | {seconds:.4f} | {tflops:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a directory made by `slm prepare`")
    parser.add_argument("--preset", default="cpu-7m")
    parser.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--compile", action="store_true", help="profile the compiled step")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--kernels", action="store_true", help="each compiled kernel on its own line")
    parser.add_argument("--shapes", action="store_true", help="the matrix products by shape, with TFLOP/s")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    torch._inductor.config.cpp.enable_kernel_profile = args.kernels
    out = Path(tempfile.mkdtemp(prefix="slm-profile-")) / "run"
    try:
        trainer = build(args.data.resolve(), out, args.preset, args.dtype, args.compile)
        for _ in range(2):  # warm-up: first-call allocations and kernel choices
            trainer.train_step()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
            started = time.perf_counter()
            for _ in range(args.steps):
                trainer.train_step()
            step_s = (time.perf_counter() - started) / args.steps
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    ops = [(e.key, e.self_cpu_time_total / 1e6 / args.steps) for e in prof.key_averages()]
    total = sum(s for _, s in ops)
    groups: dict[str, float] = defaultdict(float)
    for name, seconds in ops:
        groups[group_of(name)] += seconds
    info = cpu_info()
    print(f"{args.preset}, {args.dtype}{' compiled' * args.compile}, on {info.model} ({info.threads} threads, "
          f"{' '.join(info.features)}): {step_s:.3f} s a step (profiled)\n")
    print("| group | s a step | share |\n|---|---|---|")
    for group, seconds in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"| {group} | {seconds:.3f} | {seconds / total:.0%} |")
    top = sorted(ops, key=lambda op: -op[1])[:24 if args.kernels else 12]
    print("\n| operator | s a step | share |\n|---|---|---|")
    for name, seconds in top:
        print(f"| `{name}` | {seconds:.3f} | {seconds / total:.0%} |")
    if args.shapes:
        print_product_shapes(prof, args.steps)
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "dtype": args.dtype, "compiled": args.compile,
                                         "cpu": info.model, "features": list(info.features), "step_s": step_s,
                                         "groups": dict(groups), "top": top}, indent=2) + "\n")


if __name__ == "__main__":
    main()
