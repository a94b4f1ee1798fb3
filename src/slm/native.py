"""The native decode step (csrc/decode.c): built with the system C compiler on first use, called with ctypes.

One call computes a whole one-token step for a batch of rows on the model's own fp32 tensors and KV cache,
so the per-operator overhead of eager PyTorch, most of a CPU decode step's time, disappears. Used by the
engine for cached decode steps when the model is fp32 on the CPU and a compiler is there; ``SLM_NATIVE=0``
turns it off. Without a compiler everything runs in PyTorch (slower, same tokens).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from slm.cpu import cpuinfo_field
from slm.files import cache_dir
from slm.kv_cache import KVCache

if TYPE_CHECKING:
    from slm.model import GPT

SOURCE = Path(__file__).with_name("csrc") / "decode.c"
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
F32 = ctypes.POINTER(ctypes.c_float)


class Matrix(ctypes.Structure):
    _fields_ = [("f32", F32), ("f16", ctypes.c_void_p)]


class Layer(ctypes.Structure):
    _fields_ = [*((name, F32) for name in ("ln1_w", "ln1_b", "attn_b", "proj_b", "ln2_w", "ln2_b", "fc_b", "out_b")),
                *((name, Matrix) for name in ("attn", "proj", "fc", "out"))]


class Model(ctypes.Structure):
    _fields_ = [("llama", ctypes.c_int), *((n, ctypes.c_int) for n in ("n_layer", "d_model", "n_head", "n_kv_head",
                                                                        "head_dim", "hidden", "vocab")),
                ("eps", ctypes.c_float), *((n, F32) for n in ("wte", "wpe", "lnf_w", "lnf_b", "rope_cos", "rope_sin")),
                ("head", Matrix), ("layers", ctypes.POINTER(Layer))]


class Cache(ctypes.Structure):
    _fields_ = [("k", F32), ("v", F32), ("rows", ctypes.c_int), ("max_len", ctypes.c_int)]


def cpu_signature() -> str:
    """What -march=native compiles for: the CPU's feature flags on Linux, else the processor name."""
    return cpuinfo_field("flags") or platform.processor()


@cache
def library() -> ctypes.CDLL | None:
    """The compiled step (built once per source, compiler flags and CPU), or None without a C compiler."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS + [compiler, platform.machine(), cpu_signature()])
                         .encode()).hexdigest()[:16]
    path = cache_dir() / f"slm-decode-{key}.so"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        out = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(tmp), "-lm"], capture_output=True, text=True)
        if out.returncode != 0:
            warnings.warn(f"the native decode step did not compile, decoding in PyTorch: {out.stderr[-500:]}",
                          stacklevel=2)
            return None
        tmp.replace(path)
    lib = ctypes.CDLL(str(path))  # after torch: its libgomp is the OpenMP runtime both use
    lib.slm_decode_step.argtypes = [ctypes.POINTER(Model), ctypes.POINTER(Cache), ctypes.POINTER(ctypes.c_int64),
                                    ctypes.POINTER(ctypes.c_int64), ctypes.c_int, F32]
    lib.slm_decode_step.restype = ctypes.c_int
    return lib


def enabled() -> bool:
    return os.environ.get("SLM_NATIVE", "1") != "0"


def supports(model: GPT) -> bool:
    """fp32 weights on the CPU, contiguous (the layout the C code reads)."""
    return all(p.dtype == torch.float32 and p.device.type == "cpu" and p.is_contiguous() for p in model.parameters())


def _ptr(t: torch.Tensor | None):
    return ctypes.cast(t.data_ptr(), F32) if t is not None else None


WEIGHTS = ("fp32", "fp16")


class NativeDecoder:
    """``step(tokens, cache)``: logits ``[B, vocab]`` for one new token per row, as ``GPT.forward`` with a cache.

    ``weights="fp16"`` reads the matrices (and the output embedding) from fp16 copies: half the bytes per
    token, every product still summed in fp32; norms, biases, embeddings and the cache stay fp32.
    """

    def __init__(self, model: GPT, lib: ctypes.CDLL, weights: str = "fp32") -> None:
        if weights not in WEIGHTS:
            raise ValueError(f"decode weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
        self.model, self.lib, self.weights, c = model, lib, weights, model.config
        self.halves: list[torch.Tensor] = []  # keeps the fp16 copies alive
        llama = c.arch == "llama"
        layers = []
        for block in model.h:
            a, m = block.attn, block.mlp
            layers.append(Layer(
                ln1_w=_ptr(block.ln_1.weight), ln1_b=_ptr(getattr(block.ln_1, "bias", None)),
                attn_b=_ptr(a.c_attn.bias), proj_b=_ptr(a.c_proj.bias),
                ln2_w=_ptr(block.ln_2.weight), ln2_b=_ptr(getattr(block.ln_2, "bias", None)),
                fc_b=_ptr(m.c_fc.bias), out_b=_ptr(m.c_proj.bias),
                attn=self._matrix(a.c_attn.weight), proj=self._matrix(a.c_proj.weight),
                fc=self._matrix(m.c_fc.weight), out=self._matrix(m.c_proj.weight)))
        self.layers = (Layer * len(layers))(*layers)
        self.struct = Model(
            llama=int(llama), n_layer=c.n_layer, d_model=c.d_model, n_head=c.n_head, n_kv_head=c.kv_heads,
            head_dim=c.head_dim, hidden=c.hidden, vocab=c.vocab_size, eps=c.layer_norm_eps,
            wte=_ptr(model.wte.weight), wpe=None if llama else _ptr(model.wpe.weight),
            lnf_w=_ptr(model.ln_f.weight), lnf_b=_ptr(getattr(model.ln_f, "bias", None)),
            rope_cos=_ptr(model.rope_cos) if llama else None, rope_sin=_ptr(model.rope_sin) if llama else None,
            head=self._matrix(model.wte.weight), layers=self.layers)

    def _matrix(self, w: torch.Tensor) -> Matrix:
        if self.weights == "fp32":
            return Matrix(_ptr(w), None)
        half = w.detach().to(torch.float16).contiguous()
        self.halves.append(half)
        return Matrix(None, half.data_ptr())

    def step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        batch = tokens.shape[0]
        k = cache.k
        if k.dtype != torch.float32 or not k[0, 0].is_contiguous():
            raise ValueError("the native decode step needs an fp32 KV cache with contiguous rows")
        positions = cache.lengths.contiguous()
        last = int(positions.max())
        if last >= min(cache.max_len, self.model.config.context_length):
            raise ValueError(f"position {last} is past the context length {self.model.config.context_length}")
        tokens = tokens.reshape(batch).to(torch.int64).contiguous()
        logits = torch.empty(batch, self.model.config.vocab_size)
        view = Cache(_ptr(k), _ptr(cache.v), k.stride(0) // k.stride(1), cache.max_len)
        int64 = ctypes.POINTER(ctypes.c_int64)
        status = self.lib.slm_decode_step(ctypes.byref(self.struct), ctypes.byref(view),
                                          ctypes.cast(tokens.data_ptr(), int64),
                                          ctypes.cast(positions.data_ptr(), int64), batch, _ptr(logits))
        if status:
            raise MemoryError("the native decode step could not allocate its buffers")
        cache.advance(1)
        return logits


def available(model: GPT) -> bool:
    """Whether ``decoder_for(model)`` would return a native step."""
    return enabled() and supports(model) and library() is not None


def decoder_for(model: GPT, weights: str = "fp32") -> NativeDecoder | None:
    """The native step for this model, or None (switched off, not fp32 on the CPU, or no compiler)."""
    return NativeDecoder(model, library(), weights) if available(model) else None
