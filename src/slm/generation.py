"""Token generation: sampling, a batched decode engine with a static KV cache, generate() and stream().

The context-window schedule (docs/design.md): a sequence's *window* is what the model sees. While it is shorter
than the context, each new token is appended; when it is full, it keeps its last ``context - shift`` tokens,
and with the cache those are re-prefilled at positions ``0..``. The uncached path runs the model on the very
same window every step, so greedy output is identical with and without the cache at every length.

One module of ~490 lines because sampling, the sequences' state and the Engine that steps them change together
(a sampling setting is a SamplingParams field, a bound the server's schema reads, and a step of the Engine).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from slm.config import setting
from slm.errors import SlmError
from slm.instruct import WORD_BOOST, WORD_BOOST_RANGE, WordGuide, make_request
from slm.kv_cache import KVCache
from slm.model import GPT
from slm.native import decoder_for as native_decoder
from slm.tokenizer import StreamDecoder, Tokenizer

MAX_NEW_TOKENS_LIMIT = 100_000
DECODE_STEPS = ("auto", "native", "torch")
DecodeStep = Literal["auto", "native", "torch"]
# Bounds of the sampling settings, used by SamplingParams and by the server's request schema. Each is
# representable in float32 and keeps every logit finite, so no setting inside them can break sampling.
TEMPERATURE_MIN, TEMPERATURE_MAX = 1e-4, 5.0  # or exactly 0 (greedy): a smaller one would round to 0 in float32
PENALTY_RANGE = (-2.0, 2.0)  # frequency and presence penalties (OpenAI's range)
REPETITION_PENALTY_RANGE = (0.01, 10.0)
MIN_P_RANGE = (0.0, 1.0)
MAX_STOP_STRINGS, MAX_STOP_CHARS = 4, 200


TEMPERATURE_RULE = f"must be 0 (greedy) or between {TEMPERATURE_MIN:g} and {TEMPERATURE_MAX:g}"


def temperature_ok(t: float) -> bool:
    return t == 0 or TEMPERATURE_MIN <= t <= TEMPERATURE_MAX  # NaN fails both


class GenerationError(SlmError):
    """A generation setting or prompt that cannot be used."""


@dataclass(kw_only=True)
class SamplingParams:
    """How one sequence is sampled. These defaults are the project's only ones: `slm generate`'s flags, /predict
    and generate()/stream() take theirs from here (/v1/completions keeps OpenAI's); the bounds are the constants
    above, which the server's request schema uses too."""

    max_new_tokens: int = setting(100, f"tokens to generate at most (1..{MAX_NEW_TOKENS_LIMIT:,})")
    temperature: float = setting(0.8, "0 = greedy")
    top_k: int | None = setting(None, "sample from the K most likely tokens only (0 = off)")
    top_p: float | None = setting(None, "sample from the most likely tokens that hold this much probability")
    seed: int | None = setting(None, "same seed, same text")
    stop: tuple[str, ...] = ()  # generation ends before the first of these strings
    stop_at_eot: bool = True  # end at <|endoftext|> (when the engine knows its id)
    frequency_penalty: float = setting(0.0, f"{PENALTY_RANGE[0]:g}..{PENALTY_RANGE[1]:g}, OpenAI's: a token's logit "
                                       "drops by this for every time it was generated")
    presence_penalty: float = setting(0.0, f"{PENALTY_RANGE[0]:g}..{PENALTY_RANGE[1]:g}, OpenAI's: a token's logit "
                                      "drops by this once it was generated")
    repetition_penalty: float = setting(1.0, "> 1 discourages tokens already in the prompt or output (CTRL's and "
                                        "transformers': a seen token's logit / p if > 0, x p if < 0)")
    min_p: float | None = setting(None, "keep tokens with probability >= MIN_P x the top token's")
    words: tuple[str, ...] = ()  # requested words that decoding steers toward until used (slm.instruct.WordGuide)
    word_boost: float = setting(WORD_BOOST, f"with requested words: logit added to a word's next token until the "
                                f"text uses it ({WORD_BOOST_RANGE[0]:g}..{WORD_BOOST_RANGE[1]:g}; 0 = the model alone)")

    @property
    def penalised(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0)

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise GenerationError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise GenerationError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS_LIMIT}, "
                                  f"got {self.max_new_tokens}")
        if not temperature_ok(self.temperature):
            raise GenerationError(f"temperature {TEMPERATURE_RULE}, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0 (0 or None = off), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not PENALTY_RANGE[0] <= getattr(self, name) <= PENALTY_RANGE[1]:
                raise GenerationError(f"{name} must be between {PENALTY_RANGE[0]} and {PENALTY_RANGE[1]}, "
                                      f"got {getattr(self, name)}")
        low, high = REPETITION_PENALTY_RANGE
        if not low <= self.repetition_penalty <= high:
            raise GenerationError(f"repetition_penalty must be between {low} and {high} (1 = off), "
                                  f"got {self.repetition_penalty}")
        if self.min_p is not None and not MIN_P_RANGE[0] <= self.min_p <= MIN_P_RANGE[1]:
            raise GenerationError(f"min_p must be in [{MIN_P_RANGE[0]:g}, {MIN_P_RANGE[1]:g}], got {self.min_p}")
        self.words = make_request(tuple(self.words)).words  # InstructError names a bad word
        if not WORD_BOOST_RANGE[0] <= self.word_boost <= WORD_BOOST_RANGE[1]:
            raise GenerationError(f"word_boost must be between {WORD_BOOST_RANGE[0]:g} and {WORD_BOOST_RANGE[1]:g} "
                                  f"(0 = off), got {self.word_boost}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(s for s in self.stop if s)
        if len(self.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise GenerationError(f"stop: at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters")


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, seen: torch.Tensor,
                    params: Sequence[SamplingParams]) -> torch.Tensor:
    """Penalised logits ``[B, vocab]`` for a batch of rows at once.

    ``counts [B, vocab]``: how often each token was generated; ``seen [B, vocab]``: tokens in the prompt or
    generated. Repetition penalty first (transformers' RepetitionPenaltyLogitsProcessor), then OpenAI's
    frequency and presence penalties, as vLLM orders them.
    """
    def column(name: str) -> torch.Tensor:
        return torch.tensor([getattr(p, name) for p in params], dtype=logits.dtype, device=logits.device)[:, None]

    rep = column("repetition_penalty")
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    return logits - column("frequency_penalty") * counts - column("presence_penalty") * (counts > 0)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from ``logits [vocab]``: greedy at temperature 0, else temperature, top-k, top-p, min-p."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    # Shift the top logit to 0 before dividing: however small the temperature, the top token stays finite
    # (probability 1 in the limit) instead of inf - inf = NaN.
    logits = (logits.float() - logits.max()) / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.min_p:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    if params.top_p is not None and params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the tokens ranked above
        cut = before >= params.top_p
        cut[0] = False  # the top token always survives, also for a top_p that float32 rounds to 0
        sorted_probs[cut] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass(eq=False)  # identity, not value: two identical requests are still two sequences
class SequenceState:
    """One request being generated: its prompt, its current window, what it produced and how it ended."""

    prompt: list[int]
    params: SamplingParams
    window: list[int]
    prompt_truncated: int = 0  # prompt tokens dropped to fit the context
    generated: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of `text` already handed out by take_text()
    finished: bool = False
    finish_reason: str | None = None  # "length" | "stop" | "eot" | "cancelled" | "error"
    error: BaseException | None = None  # why sampling failed for this sequence (finish_reason "error")
    needs_prefill: bool = True
    generator: torch.Generator | None = None
    text_decoder: StreamDecoder | None = None  # token ids to text (not to be confused with the decode step)
    counts: torch.Tensor | None = None  # [vocab] generated-token counts, kept only when penalties are on
    seen: torch.Tensor | None = None  # [vocab] tokens in the prompt or generated, likewise
    guide: WordGuide | None = None  # steers toward the requested words (params.words with a boost > 0)

    def take_text(self) -> str:
        """New text since the last call; holds back what may still turn into a stop string."""
        end = len(self.text)
        if not self.finished and self.params.stop:
            for s in self.params.stop:
                for k in range(min(len(s) - 1, end), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        piece = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return piece


class Engine:
    """Decodes a changing batch of sequences, one token for each per :meth:`step`.

    With the cache, row ``i`` of the KV cache belongs to ``self.active[i]``; when sequences finish, the
    survivors move down into the freed rows, so active rows stay contiguous and a decode step is one forward pass over
    ``rows(0, n)``. A sequence joins at any step (continuous batching): its window minus the last token is
    prefilled in one forward pass, and the last token goes through the shared decode step.

    The decode step runs natively (slm/native.py: one C call per step) when the model is fp32 on the CPU and a
    C compiler is available (``decode_step="auto"``), always (``"native"``: an error where it cannot) or never
    (``"torch"``); otherwise, and for prefills, it is ``GPT.forward``.
    ``decode_weights="fp16"``: the native step reads fp16 copies of the matrices (faster, not bit-exact).

    One class of ~225 lines: the cache rows, the active sequences and the window schedule change together at
    every step, so the methods that keep them consistent live with them.
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer | None = None, max_batch: int = 16,
                 use_cache: bool = True, shift: int | None = None, decode_step: DecodeStep = "auto",
                 decode_weights: str = "fp32", eot_id: int | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.context = model.config.context_length
        self.shift = shift or max(1, self.context // 4)
        if not 1 <= self.shift < self.context:
            raise GenerationError(f"shift must be in [1, {self.context}), got {self.shift}")
        self.use_cache = use_cache
        self.max_batch = max_batch
        self.cache = KVCache.for_model(model, max_batch) if use_cache else None
        if decode_step not in DECODE_STEPS:
            raise GenerationError(f"decode_step must be one of {', '.join(DECODE_STEPS)}, got {decode_step!r}")
        wants_native = use_cache and decode_step != "torch"
        if decode_weights != "fp32" and not wants_native:
            raise GenerationError(f"decode weights {decode_weights!r} need the native decode step and the KV cache")
        self.native = native_decoder(model, decode_weights) if wants_native else None  # the C step, or None
        if (decode_step == "native" or decode_weights != "fp32") and self.native is None:
            raise GenerationError("the native decode step is unavailable: it needs an fp32 model on the CPU and a "
                                  "C compiler (and SLM_NATIVE not set to 0)")
        self.active: list[SequenceState] = []
        # The end-of-text id ends a sequence (unless its params say not): the tokenizer's, or the one given.
        self.eot_id = eot_id if eot_id is not None else tokenizer.eot_id if tokenizer is not None else None

    @property
    def free_slots(self) -> int:
        return self.max_batch - len(self.active)

    def add(self, prompt: Sequence[int], params: SamplingParams) -> SequenceState:
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise GenerationError("the prompt is empty: give at least one token")
        vocab = self.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise GenerationError(f"prompt token ids must be in [0, {vocab}), got {min(prompt)}..{max(prompt)}")
        if self.free_slots <= 0:
            raise GenerationError(f"the engine is full ({self.max_batch} sequences)")
        window = prompt[-self.context :]
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        seq = SequenceState(
            prompt=prompt,
            params=params,
            window=window,
            prompt_truncated=len(prompt) - len(window),
            generator=None if params.temperature == 0 else torch.Generator().manual_seed(seed),
            text_decoder=self.tokenizer.stream_decoder() if self.tokenizer is not None else None,
        )
        if params.penalised:
            seq.counts = torch.zeros(vocab)
            seq.seen = torch.zeros(vocab, dtype=torch.bool)
            seq.seen[prompt] = True
        if params.words and params.word_boost > 0:
            if self.tokenizer is None:
                raise GenerationError("requested words need the engine's tokenizer (to find their tokens)")
            seq.guide = WordGuide(self.tokenizer, params.words, params.word_boost)
        self.active.append(seq)
        return seq

    def cancel(self, seq: SequenceState) -> None:
        if not seq.finished:
            seq.finished, seq.finish_reason = True, "cancelled"
        self._drop_finished()

    @torch.inference_mode()
    def step(self) -> list[tuple[SequenceState, int]]:
        """Generate one token for every active sequence; returns ``(sequence, token)`` pairs."""
        if not self.active:
            return []
        logits = self._logits_cached() if self.use_cache else self._logits_uncached()
        penalised = [i for i, s in enumerate(self.active) if s.params.penalised]
        if penalised:
            rows = [self.active[i] for i in penalised]
            counts = torch.stack([s.counts for s in rows]).to(logits.device)
            seen = torch.stack([s.seen for s in rows]).to(logits.device)
            logits[penalised] = apply_penalties(logits[penalised], counts, seen, [s.params for s in rows])
        for i, seq in enumerate(self.active):  # after the penalties, which the header's words would draw
            if seq.guide is not None:
                for token, boost in seq.guide.bias(seq.generated).items():
                    logits[i, token] += boost
        produced = []
        greedy = [i for i, s in enumerate(self.active) if s.params.temperature == 0]
        tokens = [0] * len(self.active)
        if len(greedy) == len(self.active):
            tokens = logits.argmax(dim=-1).tolist()
        elif greedy:
            argmax = logits[greedy].argmax(dim=-1).tolist()
            for i, t in zip(greedy, argmax, strict=True):
                tokens[i] = t
        for i, seq in enumerate(self.active):
            if seq.params.temperature != 0:
                try:
                    tokens[i] = sample(logits[i], seq.params, seq.generator)
                except Exception as e:  # one sequence's failure ends that sequence, not its batch
                    seq.finished, seq.finish_reason, seq.error = True, "error", e
                    produced.append((seq, -1))
                    continue
            self._append(seq, tokens[i])
            produced.append((seq, tokens[i]))
        self._drop_finished()
        return produced

    def run(self, seqs: Sequence[SequenceState]) -> Iterator[None]:
        """Step until every one of ``seqs`` has finished, yielding after each step (to stream their text); a
        sequence whose sampling failed raises its error. The one loop that drives the engine, for every caller."""
        while not all(s.finished for s in seqs):
            self.step()
            raise_failed(seqs)
            yield

    def finish(self, seqs: Sequence[SequenceState]) -> None:
        """Run ``seqs`` to their end."""
        for _ in self.run(seqs):
            pass

    def reset(self) -> None:
        """Forget every sequence (after a failed step: the cache rows may be half written)."""
        for seq in self.active:
            seq.finished, seq.finish_reason = True, seq.finish_reason or "error"
        self.active = []

    # ---- internals ------------------------------------------------------------------------------------
    def _logits_uncached(self) -> torch.Tensor:
        batch, last = self._padded([s.window for s in self.active])
        return self.model(batch, logits_at=last)

    def _logits_cached(self) -> torch.Tensor:
        cache = self.cache
        assert cache is not None
        # Prefill rows that are new or whose window was shifted: contiguous runs, one forward pass each.
        i, n = 0, len(self.active)
        while i < n:
            j = i
            while j < n and self.active[j].needs_prefill:
                j += 1
            if j > i:
                self._prefill(i, j)
            i = j + 1
        last = torch.tensor([[s.window[-1]] for s in self.active], device=cache.k.device)
        if self.native is not None:
            return self.native.step(last, cache.rows(0, n))
        return self.model(last, cache=cache.rows(0, n))[:, -1]

    def _prefill(self, start: int, stop: int) -> None:
        cache = self.cache
        assert cache is not None
        rows = self.active[start:stop]
        prefixes = [s.window[:-1] for s in rows]
        cache.lengths[start:stop] = 0
        if max(map(len, prefixes)) > 0:
            batch, last = self._padded([p or [0] for p in prefixes])
            self.model(batch, cache=cache.rows(start, stop), logits_at=last)
            cache.lengths[start:stop] = torch.tensor([len(p) for p in prefixes])
        for s in rows:
            s.needs_prefill = False

    def _padded(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad to one length (causal attention never lets a real token see the padding after it)."""
        width = max(map(len, seqs))
        device = self.model.wte.weight.device
        batch = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            batch[i, : len(s)] = torch.tensor(s)
        return batch.to(device), torch.tensor([len(s) - 1 for s in seqs], device=device)

    def _append(self, seq: SequenceState, token: int) -> None:
        params = seq.params
        if seq.counts is not None:
            seq.counts[token] += 1
            seq.seen[token] = True
        if params.stop_at_eot and token == self.eot_id:
            seq.finished, seq.finish_reason = True, "eot"
        else:
            seq.generated.append(token)
            if seq.text_decoder is not None:
                seq.text += seq.text_decoder.push(token)
                if seq.guide is not None:
                    seq.guide.update(seq.text)
                if params.stop:
                    hits = [i for i in (seq.text.find(s, max(0, seq.emitted - len(s))) for s in params.stop)
                            if i >= 0]
                    if hits:
                        seq.text = seq.text[: min(hits)]
                        seq.finished, seq.finish_reason = True, "stop"
            if not seq.finished and len(seq.generated) >= params.max_new_tokens:
                seq.finished, seq.finish_reason = True, "length"
        if seq.finished:
            if seq.text_decoder is not None and seq.finish_reason != "stop":
                seq.text += seq.text_decoder.flush()
            return
        if len(seq.window) < self.context:
            seq.window.append(token)
        else:  # the window is full: keep its last tokens and recompute them from position 0
            seq.window = (seq.window + [token])[-(self.context - self.shift) :]
            seq.needs_prefill = True

    def _drop_finished(self) -> None:
        keep = [s for s in self.active if not s.finished]
        if len(keep) == len(self.active):
            return
        if self.cache is not None:  # move survivors down into the freed rows, preserving order
            for new_row, seq in enumerate(keep):
                old_row = self.active.index(seq)
                if old_row != new_row and not seq.needs_prefill:
                    self.cache.copy_row(old_row, new_row)
        self.active = keep


def raise_failed(seqs: Sequence[SequenceState]) -> None:
    """Raise the first sequence's sampling error: the engine records it, callers of the library see it."""
    for seq in seqs:
        if seq.error is not None:
            raise seq.error


def _as_lists(tokens: torch.Tensor | Sequence[Sequence[int]]) -> list[list[int]]:
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 2:
            raise GenerationError(f"tokens must be a [batch, time] tensor, got shape {tuple(tokens.shape)}")
        return tokens.tolist()
    return [list(t) for t in tokens]


def generate(
    model: GPT,
    tokens: torch.Tensor | Sequence[Sequence[int]],
    params: SamplingParams | None = None,
    tokenizer: Tokenizer | None = None,
    use_cache: bool = True,
    eot_id: int | None = None,
) -> torch.Tensor | list[list[int]]:
    """Continue each prompt as ``params`` say (SamplingParams' defaults when None); returns prompt + new tokens
    (a ``[B, T + new]`` tensor for a tensor input).

    Row ``i`` samples with seed ``params.seed + i``. Generation ends at ``max_new_tokens``, at the end-of-text
    token (given ``tokenizer`` or ``eot_id``; such rows are padded with it in a tensor result), or at a stop
    string (needs ``tokenizer``).
    """
    params = params or SamplingParams()
    prompts = _as_lists(tokens)
    if not prompts:
        raise GenerationError("no prompts given")
    engine = Engine(model, tokenizer, max_batch=len(prompts), use_cache=use_cache, eot_id=eot_id)
    seqs = [engine.add(p, dataclasses.replace(params, seed=None if params.seed is None else params.seed + i))
            for i, p in enumerate(prompts)]
    engine.finish(seqs)
    if isinstance(tokens, torch.Tensor):
        pad = engine.eot_id if engine.eot_id is not None else 0
        out = [s.prompt + s.generated + [pad] * (params.max_new_tokens - len(s.generated)) for s in seqs]
        return torch.tensor(out, dtype=tokens.dtype, device=tokens.device)
    return [s.prompt + s.generated for s in seqs]


def stream(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    params: SamplingParams | None = None,
    use_cache: bool = True,
) -> Iterator[str]:
    """Yield the continuation of one prompt as text pieces, as they are produced (never half a character)."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    engine = Engine(model, tokenizer, max_batch=1, use_cache=use_cache)
    seq = engine.add(ids, params or SamplingParams())
    for _ in engine.run([seq]):
        piece = seq.take_text()
        if piece:
            yield piece
