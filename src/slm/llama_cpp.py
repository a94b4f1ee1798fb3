"""Run llama.cpp's own tools on a GGUF export: greedy text from `llama-simple`, speed from `llama-bench`.

The binaries come from ``make llama-cpp`` (tools/build_llama_cpp.py, into build/llama.cpp/bin) or from
``$SLM_LLAMA_CPP_BIN`` (a folder); this module only finds and runs them.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

BUILD_BIN = Path(__file__).resolve().parents[2] / "build" / "llama.cpp" / "bin"


class LlamaCppMissing(RuntimeError):
    """llama.cpp's tools are not built."""


def find(tool: str) -> Path:
    folder = Path(os.environ.get("SLM_LLAMA_CPP_BIN", BUILD_BIN))
    path = folder / tool
    if not path.is_file():
        raise LlamaCppMissing(f"{path} not found: build llama.cpp's tools with `make llama-cpp` "
                              f"(or point SLM_LLAMA_CPP_BIN at a folder holding {tool})")
    return path


def available() -> bool:
    try:
        find("llama-simple"), find("llama-bench")
    except LlamaCppMissing:
        return False
    return True


def greedy_text(gguf: str | Path, prompt: str, n: int, timeout: float = 300) -> bytes:
    """The prompt and ``n`` greedy tokens (fewer at end-of-text) as llama-simple prints them: raw bytes."""
    out = subprocess.run([str(find("llama-simple")), "-m", str(gguf), "-n", str(n), prompt],
                         capture_output=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"llama-simple failed ({out.returncode}): {out.stderr.decode(errors='replace')[-2000:]}")
    return out.stdout.removesuffix(b"\n")  # it ends its output with one newline of its own


def decode_speed(gguf: str | Path, n: int, threads: int, repeats: int = 3, timeout: float = 600) -> float:
    """Tokens per second decoding ``n`` tokens at batch 1 (``llama-bench -p 0 -n N``, mean of ``repeats``)."""
    cmd = [str(find("llama-bench")), "-m", str(gguf), "-p", "0", "-n", str(n), "-t", str(threads),
           "-r", str(repeats), "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({out.returncode}): {out.stderr[-2000:]}")
    return float(json.loads(out.stdout)[0]["avg_ts"])
