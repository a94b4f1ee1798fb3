"""The nanoGPT move, as a new user makes it: one plain text file -> prepare -> train -> generate / eval.

Everything through the real command line, checking what it says as well as what it does.
"""

from __future__ import annotations

import json
import random

import pytest

from conftest import make_story, slm_cli


def one_long_text(path, n_stories: int = 300) -> None:
    """A single text file with no blank line: one document, the shape of tiny-shakespeare's input.txt."""
    rng = random.Random(0)
    path.write_text("\n".join(make_story(rng).replace("\n\n", "\n") for _ in range(n_stories)), encoding="utf-8")


@pytest.mark.slow
def test_one_text_file_from_prepare_to_generate(tmp_path):
    text = tmp_path / "input.txt"
    one_long_text(text)
    data, run = tmp_path / "data", tmp_path / "run"

    r = slm_cli("prepare", str(text), "--out", str(data), "--vocab-size", "400", "--val-fraction", "0.1", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "validation split: the last 10% of each document" in r.stdout
    meta = json.loads((data / "meta.json").read_text())
    assert meta["split"] == "tail" and meta["val"]["tokens"] > 1000
    assert 0.07 < meta["val"]["bytes"] / (meta["train"]["bytes"] + meta["val"]["bytes"]) < 0.13

    r = slm_cli("train", "--data", str(data), "--out", str(run), "--preset", "tiny", "--arch", "llama",
                "--n-layer", "2", "--n-head", "2", "--d-model", "64", "--context-length", "32", "--max-steps", "40",
                "--eval-interval", "20", "--eval-windows", "8", "--batch-size", "8", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "nan" not in r.stdout
    assert f"-> {run}/best" in r.stdout and (run / "best" / "model.safetensors").is_file()
    shape = json.loads((run / "best" / "config.json").read_text())["model"]
    assert (shape["arch"], shape["n_layer"], shape["n_head"], shape["d_model"], shape["context_length"]) == (
        "llama", 2, 2, 64, 32)

    r = slm_cli("generate", "--model", str(run), "--prompt", "Once upon a time", "--max-new-tokens", "10",
                "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert f"model: {run}/best" in r.stderr and r.stdout.startswith("Once upon a time")
    r = slm_cli("eval", "--model", str(run), str(text), "--json")
    assert r.returncode == 0, r.stderr
    assert f"model: {run}/best" in r.stderr and json.loads(r.stdout)


@pytest.mark.slow
def test_training_without_validation_names_last(tmp_path):
    text = tmp_path / "input.txt"
    one_long_text(text, 100)
    r = slm_cli("prepare", str(text), "--out", str(tmp_path / "data"), "--vocab-size", "300", "--val-fraction", "0",
                "--quiet")
    assert r.returncode == 0 and "validation split: none" in r.stdout
    r = slm_cli("train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--preset", "tiny",
                "--max-steps", "5", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "nan" not in r.stdout and "no validation split" in r.stdout and f"{tmp_path}/run/last" in r.stdout
    assert not (tmp_path / "run" / "best").exists()
    r = slm_cli("generate", "--model", str(tmp_path / "run"), "--prompt", "The", "--max-new-tokens", "3")
    assert r.returncode == 0 and f"model: {tmp_path}/run/last" in r.stderr


def test_a_few_documents_split_by_position_and_a_tiny_corpus_is_refused(tmp_path):
    from slm.data import DataError
    from slm.prepare import prepare

    docs = tmp_path / "docs"
    docs.mkdir()
    rng = random.Random(1)
    for i in range(3):  # three files: too few to hold one out whole at 5%
        (docs / f"{i}.txt").write_text(" ".join(make_story(rng) for _ in range(20)), encoding="utf-8")
    meta = prepare([docs], tmp_path / "a", vocab_size=300, val_fraction=0.05, progress=False)
    assert meta["split"] == "tail" and meta["val"]["documents"] == 3 and meta["val"]["tokens"] > 0
    with pytest.raises(DataError, match="--split documents drew no validation document from 3"):
        prepare([docs], tmp_path / "b", vocab_size=300, val_fraction=0.05, split="documents", progress=False)
    (tmp_path / "tiny.txt").write_text("a", encoding="utf-8")
    with pytest.raises(DataError, match="too small to hold out a validation split.*--val-fraction 0"):
        prepare([tmp_path / "tiny.txt"], tmp_path / "c", vocab_size=300, val_fraction=0.1, progress=False)


@pytest.mark.parametrize("content, outcome", [
    (b"Once upon a time\x00\x01\x02 binary", "NUL bytes"),
    ("caf\u00e9 ".encode("latin-1") * 200, "not UTF-8 text"),
    (b"Once upon a time there was a fox. " * 200 + "caf\u00e9".encode("latin-1"), "warning"),
])
def test_files_that_are_not_text(tmp_path, content, outcome):
    path = tmp_path / "input.txt"
    path.write_bytes(content)
    r = slm_cli("prepare", str(path), "--out", str(tmp_path / "data"), "--vocab-size", "300", "--quiet")
    if outcome == "warning":
        assert r.returncode == 0, r.stderr
        assert f"warning: {path}: 1 invalid UTF-8 byte(s) replaced by U+FFFD" in r.stderr
    else:
        assert r.returncode == 2 and outcome in r.stderr and str(path) in r.stderr and "Traceback" not in r.stderr
