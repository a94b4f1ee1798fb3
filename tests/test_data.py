"""Data preparation: readers, splits by document, token files, per-input ranges and --mix, bad input."""

from __future__ import annotations

import gzip
import json
import time

import numpy as np
import pytest

from slm.corpus import list_files, read_documents
from slm.data import DataError, load_meta
from slm.prepare import prepare, token_dtype


# ---- prepare ----------------------------------------------------------------------------------------------
def test_prepare_writes_token_files_and_meta(prepared, corpus):
    meta = load_meta(prepared)
    assert 300 < meta["vocab_size"] <= 512 and meta["dtype"] == "uint16"  # BPE stops when no pair repeats
    assert meta["train"]["documents"] + meta["val"]["documents"] == 400
    assert 20 <= meta["val"]["documents"] <= 70  # ~10% by document
    for split in ("train", "val"):
        tokens = np.memmap(prepared / f"{split}.bin", dtype=np.uint16, mode="r")
        assert len(tokens) == meta[split]["tokens"]
        assert (tokens == meta["eot_id"]).sum() == meta[split]["documents"]  # one separator per document
        assert meta[split]["bytes_per_token"] > 2
    total_chars = sum(len(d) for d in read_documents(corpus))
    assert meta["train"]["characters"] + meta["val"]["characters"] == total_chars


def test_split_is_deterministic_by_document(corpus, tmp_path):
    a = prepare([corpus], tmp_path / "a", vocab_size=300, val_fraction=0.2, seed=3, progress=False)
    b = prepare([corpus], tmp_path / "b", vocab_size=300, val_fraction=0.2, seed=3, progress=False)
    c = prepare([corpus], tmp_path / "c", vocab_size=300, val_fraction=0.2, seed=4, progress=False)
    assert (tmp_path / "a" / "val.bin").read_bytes() == (tmp_path / "b" / "val.bin").read_bytes()
    assert a["val"] == b["val"] and a["val"] != c["val"]


def test_readers_for_every_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("first text file")
    (d / "sub" / "b.md").write_text("# markdown file")
    (d / "c.jsonl").write_text(json.dumps({"text": "json one"}) + "\n\n" + json.dumps({"text": "json two"}) + "\n")
    with gzip.open(d / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "gz text", "text": "gz one"}) + "\n")
    pq.write_table(pa.table({"text": ["pq one", "pq two"]}), d / "e.parquet")
    (d / "ignored.bin").write_bytes(b"\x00\x01")
    files = list_files([d])
    assert [f.name for f in files] == ["a.txt", "c.jsonl", "d.jsonl.gz", "e.parquet", "b.md"]
    docs = [doc for f in files for doc in read_documents(f)]
    assert docs == ["first text file", "json one", "json two", "gz one", "pq one", "pq two", "# markdown file"]
    assert list(read_documents(d / "d.jsonl.gz", text_field="body")) == ["gz text"]
    meta = prepare([d], tmp_path / "out", vocab_size=300, val_fraction=0.0, progress=False)
    assert meta["train"]["documents"] == 7


def test_prepare_reuses_gpt2_tokenizer(corpus, tmp_path):
    meta = prepare([corpus], tmp_path / "g", tokenizer="gpt2", val_fraction=0.05, progress=False)
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and meta["dtype"] == "uint16"


def test_token_dtype_widens_for_big_vocabularies():
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


@pytest.mark.parametrize("setup, message", [
    (lambda d: [d / "missing.txt"], "input not found"),
    (lambda d: [(d / "empty").mkdir() or d / "empty"], "no readable text"),
    (lambda d: [(d / "e.txt").write_text("  \n") and d / "e.txt"], "corpus is empty"),
    (lambda d: [(d / "x.csv").write_text("a,b") and d / "x.csv"], "unsupported file type"),
    (lambda d: [(d / "bad.jsonl").write_text('{"text": "ok"}\n{"title": "no text"}\n') and d / "bad.jsonl"],
     r"bad.jsonl:2: no 'text' field"),
    (lambda d: [(d / "broken.jsonl").write_text('{"text": "ok"}\n{oops\n') and d / "broken.jsonl"],
     r"broken.jsonl:2: not valid JSON"),
])
def test_prepare_bad_input(tmp_path, setup, message):
    with pytest.raises(DataError, match=message):
        prepare(setup(tmp_path), tmp_path / "out", vocab_size=300, progress=False)


# ---- train ------------------------------------------------------------------------------------------------


def test_hf_dataset_fails_fast_with_a_clear_message(tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("datasets") is None:
        match = "needs the `datasets` package"
    else:  # installed: offline mode must refuse at once instead of hanging on retries
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        match = "offline"
    start = time.time()
    with pytest.raises(DataError, match=match):
        prepare([], tmp_path / "out", hf_dataset="roneneldan/TinyStories", progress=False)
    assert time.time() - start < 30


def test_prepare_records_each_input_and_mix_samples_by_weight(tmp_path):
    from slm.data import BatchSampler, mixture, open_tokens

    for name, animal in (("foxes", "fox"), ("owls", "owl")):
        lines = [json.dumps({"text": f"The {animal} number {i} ran to the {animal} house."}) for i in range(300)]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    meta = prepare([tmp_path / "foxes.jsonl", tmp_path / "owls.jsonl"], tmp_path / "d", vocab_size=300,
                   val_fraction=0.1, progress=False)
    foxes, owls = meta["sources"]
    assert foxes["train"][0] == 0 and foxes["train"][1] == owls["train"][0]
    assert owls["train"][1] == meta["train"]["tokens"]
    assert owls["val"][1] == meta["val"]["tokens"]
    tokens = open_tokens(tmp_path / "d", "train", meta)

    def share_of_owls(spec: str) -> float:
        offsets = BatchSampler(tokens, 16, 0, mixture(meta, spec)).draw(4000)
        return float(np.mean(offsets >= owls["train"][0]))

    assert share_of_owls("owls=0") == 0.0
    assert 0.45 < share_of_owls("owls=1") < 0.55  # same size, same weight
    assert 0.75 < share_of_owls("owls=4") < 0.85  # 4 : 1
    assert mixture(meta, "") is None
    with pytest.raises(DataError, match="no input file name starts with 'cats'.*foxes.jsonl, owls.jsonl"):
        mixture(meta, "cats=2")
    with pytest.raises(DataError, match="NAME=WEIGHT"):
        mixture(meta, "owls")
