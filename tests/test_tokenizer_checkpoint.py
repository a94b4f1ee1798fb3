"""Tokenizer round trips and the checkpoint directory format."""

from __future__ import annotations

import json

import pytest
import torch

from slm import checkpoint
from slm.checkpoint import CheckpointError
from slm.tokenizer import EOT, Tokenizer, TokenizerError

TRICKY = [
    "plain ASCII, with punctuation!?",
    "  leading and trailing spaces  \n\n\ttabs\r\nand CRLF",
    "accents: café, naïve, Ångström, crème brûlée",
    "CJK: 日本語のテキスト, 中文, 한국어",
    "emoji: 🙂👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈",
    "combining: e\u0301 a\u0308 and zero-width: a\u200bb\u200dc",
    "RTL: שלום עולם مرحبا بالعالم",
    "math: ∀x∈ℝ, √2 ≈ 1.414, ∞",
    EOT + " separators " + EOT,
    "\x00 control \x07 chars \x7f",
]


@pytest.fixture(scope="module")
def small_tokenizer():
    texts = ["Once upon a time there was a little rabbit.", "The fox ran into the woods."] * 50
    return Tokenizer.train(iter(texts), vocab_size=300)


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_on_tricky_unicode(small_tokenizer, text):
    assert small_tokenizer.decode(small_tokenizer.encode(text)) == text


@pytest.mark.parametrize("text", TRICKY)
def test_gpt2_round_trip(text):
    tok = Tokenizer.gpt2()
    assert tok.decode(tok.encode(text)) == text


def test_gpt2_vocabulary_offline():
    tok = Tokenizer.gpt2()
    assert tok.vocab_size == 50257 and tok.eot_id == 50256 and tok.kind == "gpt2"
    assert tok.encode("A little girl went to the woods") == [32, 1310, 2576, 1816, 284, 262, 16479]
    assert tok.encode(EOT) == [50256]


def test_trained_tokenizer_learns_merges_and_saves(small_tokenizer, tmp_path):
    assert small_tokenizer.vocab_size == 300
    assert small_tokenizer.encode(EOT) == [small_tokenizer.eot_id]
    # Merges were learnt: a frequent word takes far fewer tokens than bytes.
    assert len(small_tokenizer.encode(" rabbit")) <= 2
    small_tokenizer.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path)
    assert again.encode("a little rabbit") == small_tokenizer.encode("a little rabbit")


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.load(tmp_path / "nope.json")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read"):
        Tokenizer.load(tmp_path)
    with pytest.raises(TokenizerError, match="at least 257"):
        Tokenizer.train(["abc"], vocab_size=100)


# ---- checkpoints ------------------------------------------------------------------------------------------
def test_checkpoint_round_trip(tiny_model, small_tokenizer, tmp_path):
    checkpoint.save(tiny_model, small_tokenizer, tmp_path / "ck", training={"steps": 3})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors",
                                                                   "tokenizer.json"]
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert meta["training"] == {"steps": 3} and meta["model"]["n_layer"] == tiny_model.config.n_layer
    model, tok = checkpoint.load(tmp_path / "ck")
    for a, b in zip(tiny_model.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert tok.encode("hello") == small_tokenizer.encode("hello")


def test_fp16_checkpoint_loads_as_fp32(tiny_model, small_tokenizer, tmp_path):
    checkpoint.save(tiny_model, small_tokenizer, tmp_path / "ck", dtype=torch.float16)
    model, _ = checkpoint.load(tmp_path / "ck")
    w = model.wte.weight
    assert w.dtype == torch.float32
    assert torch.equal(w, tiny_model.wte.weight.half().float())


def test_pickle_is_refused(tiny_model, tmp_path):
    torch.save(tiny_model.state_dict(), tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="pickle"):
        checkpoint.load(tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="pickle"):
        checkpoint.load(tmp_path)


def test_missing_and_corrupt_checkpoints(tiny_model, small_tokenizer, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        checkpoint.load(tmp_path / "missing")
    checkpoint.save(tiny_model, small_tokenizer, tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="cannot read weights"):
        checkpoint.load(tmp_path / "ck")
    checkpoint.save(tiny_model, small_tokenizer, tmp_path / "ck2")
    meta = json.loads((tmp_path / "ck2" / "config.json").read_text())
    meta["model"]["d_model"] = 48
    (tmp_path / "ck2" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match config.json"):
        checkpoint.load(tmp_path / "ck2")
    (tmp_path / "ck2" / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        checkpoint.load(tmp_path / "ck2")
