"""The machine policy of a training run, in one place (`slm train` follows it, `slm info` shows it): the
device, the autocast precision (``--dtype auto``: bf16 where this machine runs it faster) and whether to
compile."""

from __future__ import annotations

import os
import shutil
from functools import cache

import torch

from slm.cpu import BF16_MIN_SPEEDUP, FEATURES, bf16_pays, bf16_speedup, cpu_info
from slm.errors import SlmError


class MachineError(SlmError):
    """A device or precision this machine does not have."""


# torch.compile costs tens of seconds before the first step on a small CPU, then saves a share of every step
# (docs/training-on-cpu.md): unasked, it is on for runs long enough to earn that back.
COMPILE_MIN_STEPS = 500


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MachineError("--device cuda: no CUDA GPU is available here; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise MachineError("--device mps: Apple MPS is not available here; use --device cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise MachineError(f"--device {name!r}: choose auto, cpu, cuda or mps")
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA, and on CPUs where bf16 matrix products measure faster (slm.cpu); fp32 otherwise
    (auto), or as asked."""
    if name not in ("auto", "fp32", "bf16"):
        raise MachineError(f"--dtype {name!r}: choose auto, fp32 or bf16")
    if name == "fp32":
        return None
    if name == "auto" and (device.type == "mps" or (device.type == "cpu" and not bf16_pays())):
        return None
    return torch.bfloat16


def cpu_bf16_fast(device: torch.device) -> bool:
    """Whether ``device`` is a CPU that runs bf16 products fast: Muon's iteration is bf16 there (slm.optim)."""
    return device.type == "cpu" and bf16_pays()


@cache
def compile_works(device_type: str) -> bool:
    """Whether torch.compile builds and runs a kernel on this device here: inductor needs a C++ compiler and
    Python's headers on a CPU, triton on CUDA. A few seconds, paid only by runs that compile unasked."""
    try:
        return float(torch.compile(lambda x: x * 2 + 1)(torch.ones(4, device=device_type)).sum()) == 12.0
    except Exception:  # a missing compiler, headers or triton: inductor's errors share no narrower base class
        return False


def compile_wanted(asked: bool | None, max_steps: int, device: torch.device) -> bool:
    """--compile or --no-compile as ``asked``; unset, on where it pays: a run of COMPILE_MIN_STEPS or more, on a
    CPU or CUDA device where compiling works."""
    if asked is not None:
        return asked
    return max_steps >= COMPILE_MIN_STEPS and device.type in ("cpu", "cuda") and compile_works(device.type)


def report() -> list[str]:
    """What this machine is and what `auto` picks on it, for training and for decoding."""
    from slm import native

    info = cpu_info()
    speedup = bf16_speedup()
    missing = [f for f in FEATURES if f not in info.features]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (training and serving run on the CPU)"
    bf16 = speedup >= BF16_MIN_SPEEDUP
    compiler = native.library() is not None
    cxx = shutil.which(os.environ.get("CXX", "g++"))  # the C++ compiler torch.compile's CPU kernels are built with
    return [
        f"CPU: {info.model} ({info.logical_cpus} logical CPUs; torch uses {info.threads} threads)",
        f"features: {' '.join(info.features) or '-'}" + (f" (not: {' '.join(missing)})" if missing else ""),
        f"bf16 matrix products: {speedup:.2f}x the speed of fp32 here (measured once, cached)",
        f"train --dtype auto: {'bf16 autocast' if bf16 else 'fp32'} (bf16 needs >= {BF16_MIN_SPEEDUP:g}x); "
        f"Muon's iteration: {'bf16' if bf16 else 'fp32'}",
        f"train --compile unset: on for runs of {COMPILE_MIN_STEPS}+ steps where torch.compile works (C++ compiler: "
        + (f"{cxx})" if cxx else "none found, so eager on the CPU)")
        + ("; compiled bf16 steps take slm's own attention backward and chunked loss" if bf16 and cxx else ""),
        "decoding: " + ("the native C step (fp32 weights; --decode-weights fp16 for the fp16 copies)" if compiler and
                        native.enabled() else "the PyTorch step (" + ("SLM_NATIVE=0" if not native.enabled()
                                                                    else "no C compiler found") + ")"),
        f"GPU: {gpu}",
    ]
