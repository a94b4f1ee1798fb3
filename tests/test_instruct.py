"""Stories that follow a request (slm.instruct): the format, `slm prepare --instruct`, the loss mask, the saved
template, and a tiny model that learns to use the words it is given."""

from __future__ import annotations

import json
import random
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from conftest import slm_cli
from slm import checkpoint, instruct
from slm.data import BatchSampler, open_mask, open_tokens, trains_on_instruct
from slm.errors import SlmError
from slm.generation import Engine, SamplingParams
from slm.prepare import prepare
from slm.tokenizer import Tokenizer
from slm.train import train
from slm.train_config import TrainConfig


def test_header_format():
    request = instruct.make_request(["bottle", "queen", "loud"], ["Dialogue"])
    assert instruct.header(request) == "Words: bottle, queen, loud\nFeatures: Dialogue\nStory:\n"
    assert instruct.header(instruct.make_request(["cat"])) == "Words: cat\nStory:\n"
    assert not instruct.make_request()


@pytest.mark.parametrize("words, features, message", [
    (["a"] * 9, [], "at most 8 words"),
    (["b@d"], [], "'b@d' is not a word"),
    (["two words"], [], "is not a word"),
    (["x" * 25], [], "at most 24 characters"),
    (["cat"], ["twist"], "unknown feature(s) 'twist'"),
])
def test_bad_requests_name_the_problem(words, features, message):
    with pytest.raises(instruct.InstructError, match=message.replace("(", r"\(").replace(")", r"\)")):
        instruct.make_request(words, features)


def test_training_requests_come_from_the_story():
    story = 'Once upon a time Tom found a shiny stone by the river. "Look!" he said. "It glows," said Sue.'
    words = instruct.content_words(story)
    assert words == ["found", "shiny", "stone", "river", "glows"]  # no function words, no names
    request = instruct.training_request(story, seed=0)
    assert len(request.words) == 3 and set(request.words) <= set(words)
    assert request == instruct.training_request(story, seed=0)  # the same corpus prepares the same way
    assert request.features == ("dialogue",)
    assert instruct.detect_features("No one spoke at all.") == ()


def test_story_parts_cut_at_paragraphs():
    text = "\n\n".join(f"Paragraph {i} " + "word " * 60 for i in range(20))
    parts = instruct.story_parts(text, size=1000)
    assert len(parts) > 1 and all(len(p) <= 1000 + 400 for p in parts)
    assert "\n\n".join(parts) == text.strip()


def test_used_words_counts_simple_inflections():
    story = "The dogs were running. A girl smiled and jumped over the boxes."
    assert instruct.used_words(story, ["dog", "run", "smile", "jump", "box", "cat"]) == [
        True, True, True, True, True, False]


def test_used_words_counts_possessives():  # WORD_RE keeps the apostrophe: "queen's" is one match
    story = "It was louder than the queen's voice, and the girls' dogs barked."
    assert instruct.used_words(story, ["queen", "girl", "dog", "loud"]) == [True, True, True, False]


# ---- prepare --instruct and the loss mask ----------------------------------------------------------------
def test_prepare_writes_instruct_copies_with_a_mask(corpus, tmp_path):
    meta = prepare([corpus], tmp_path, vocab_size=512, val_fraction=0.1, progress=False, instruct="stories")
    assert meta["inputs"][1] == "instruct:stories.jsonl"
    assert meta["instruct"] == {"template": instruct.TEMPLATE, "inputs": ["instruct:stories.jsonl"],
                                "words": instruct.N_WORDS, "part_chars": instruct.STORY_CHARS}
    tok = Tokenizer.load(tmp_path)
    for split in ("train", "val"):
        tokens, mask = open_tokens(tmp_path, split, meta), open_mask(tmp_path, split)
        assert len(mask) == len(tokens)
        plain, copies = (meta["sources"][i][split] for i in (0, 1))
        assert mask[plain[0] : plain[1]].all()  # plain text: every token is learned
        text = tok.decode(tokens[copies[0] : copies[1]].tolist())
        # Each copy is on the same side of the split as its original: the same stories, after headers.
        originals = tok.decode(tokens[plain[0] : plain[1]].tolist()).split("<|endoftext|>")[:-1]
        stories = [doc.split("Story:\n", 1)[1] for doc in text.split("<|endoftext|>")[:-1]]
        assert stories == originals
        headers = [doc.split("Story:\n", 1)[0] for doc in text.split("<|endoftext|>")[:-1]]
        assert all(h.startswith("Words: ") for h in headers)
        # The mask leaves out exactly the header tokens.
        n_header_tokens = sum(len(tok.encode(h + "Story:\n")) for h in headers)
        assert int((mask[copies[0] : copies[1]] == 0).sum()) == n_header_tokens


def test_instruct_words_and_part_size_are_settings(corpus, tmp_path):
    meta = prepare([corpus], tmp_path, vocab_size=512, val_fraction=0.1, progress=False, instruct="stories",
                   instruct_words=5, instruct_part_chars=150)
    assert (meta["instruct"]["words"], meta["instruct"]["part_chars"]) == (5, 150)
    tok = Tokenizer.load(tmp_path)
    copies = meta["sources"][1]["train"]
    docs = tok.decode(open_tokens(tmp_path, "train", meta)[copies[0] : copies[1]].tolist()).split("<|endoftext|>")
    heads, stories = zip(*(d.split("Story:\n", 1) for d in docs[:-1]), strict=True)
    counts = [len(h.split("\n")[0].removeprefix("Words: ").split(", ")) for h in heads]
    expected = [min(5, len(instruct.content_words(s))) for s in stories]
    assert counts == expected and max(counts) == 5
    plain = meta["sources"][0]["train"]
    n_documents = int((open_tokens(tmp_path, "train", meta)[plain[0] : plain[1]] == tok.eot_id).sum())
    assert len(stories) >= 2 * n_documents and max(map(len, stories)) < 150 + 200  # parts, not documents


@pytest.mark.parametrize("flag, message", [("--instruct-words=9", "--instruct-words must be between 1 and 8"),
                                           ("--instruct-part-chars=10", "--instruct-part-chars must be at least")])
def test_bad_instruct_settings_are_one_line(corpus, tmp_path, flag, message):
    r = slm_cli("prepare", str(corpus), "--out", str(tmp_path), "--instruct", "stories", flag, "--quiet")
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_the_template_follows_the_mix(corpus, tmp_path):
    meta = prepare([corpus], tmp_path, vocab_size=512, val_fraction=0.1, progress=False, instruct="stories")
    assert trains_on_instruct(meta, "") and trains_on_instruct(meta, "stories=0")
    assert not trains_on_instruct(meta, "instruct=0")  # instruct copies never sampled: no template learned
    assert not trains_on_instruct(prepare([corpus], tmp_path / "plain", vocab_size=512, val_fraction=0.1,
                                          progress=False), "")


def test_prepare_instruct_names_an_unknown_input(corpus, tmp_path):
    r = slm_cli("prepare", str(corpus), "--out", str(tmp_path), "--instruct", "novels", "--quiet")
    assert r.returncode == 2
    assert "--instruct: no input file name starts with 'novels' (inputs: stories.jsonl)" in r.stderr


def test_sampler_ignores_header_targets():
    tokens = np.arange(40, dtype=np.uint16)
    mask = np.ones(40, dtype=np.uint8)
    mask[10:15] = 0
    sampler = BatchSampler(tokens, 8, seed=0, mask=mask)
    x, y = sampler.windows(np.array([5]))
    assert x[0].tolist() == list(range(5, 13))
    assert y[0].tolist() == [6, 7, 8, 9, -100, -100, -100, -100]
    x, y = sampler.windows(np.array([12]))
    assert y[0].tolist() == [-100, -100, 15, 16, 17, 18, 19, 20]


# ---- a tiny model learns to use the requested words ------------------------------------------------------
NOUNS = ["cat", "dog", "fox", "owl", "bear", "duck", "frog", "goat", "lion", "mouse", "pig", "hen",
         "cake", "ball", "boat", "kite", "drum", "hat", "lamp", "bell", "ring", "shoe", "cup", "key"]


def noun_story(rng: random.Random) -> str:
    a, b, c = rng.sample(NOUNS, 3)  # the story's only content words: its request draws exactly these three
    return f"Once upon a time there was a {a}. The {a} saw a {b}. Then the {b} saw a {c}."


def train_story_model(tmp: Path, instruct_inputs: str) -> Path:
    rng = random.Random(0)
    corpus = tmp / "nouns.jsonl"
    corpus.write_text("".join(json.dumps({"text": noun_story(rng)}) + "\n" for _ in range(1500)))
    data = tmp / f"data-{bool(instruct_inputs)}"
    prepare([corpus], data, vocab_size=512, val_fraction=0.05, progress=False, instruct=instruct_inputs)
    cfg = TrainConfig(preset="tiny-llama", optimizer="muon", batch_size=16, max_steps=400, warmup_steps=20,
                      eval_interval=400, eval_windows=8, log_interval=50, seed=0, device="cpu", dtype="fp32",
                      mix="nouns=0" if instruct_inputs else "")  # instruct copies only: every story has a header
    train(data, tmp / f"run-{bool(instruct_inputs)}", cfg, progress=False)
    return tmp / f"run-{bool(instruct_inputs)}" / "last"


def inclusion_rate(model_dir: Path, requests: list[tuple[str, ...]]) -> float:
    model, tokenizer = checkpoint.load(model_dir)
    engine = Engine(model, tokenizer, max_batch=len(requests))
    seqs = [engine.add(tokenizer.encode(instruct.header(instruct.make_request(words))),
                       SamplingParams(max_new_tokens=40, temperature=0.8, seed=i)) for i, words in enumerate(requests)]
    while not all(s.finished for s in seqs):
        engine.step()
    used = [u for s, words in zip(seqs, requests, strict=True) for u in instruct.used_words(s.text, words)]
    return sum(used) / len(used)


@pytest.mark.slow
def test_a_model_trained_with_the_template_uses_the_words(tmp_path):
    torch.manual_seed(0)
    with_template = train_story_model(tmp_path, "nouns")
    without = train_story_model(tmp_path, "")
    assert checkpoint.template(with_template) == instruct.TEMPLATE and checkpoint.template(without) is None
    rng = random.Random(1)
    requests = [tuple(rng.sample(NOUNS, 3)) for _ in range(24)]
    rate_with, rate_without = inclusion_rate(with_template, requests), inclusion_rate(without, requests)
    # Without the template the words are a guess among 24 nouns (about 3 in 24 per slot); with it, copied.
    assert rate_with >= 0.6 and rate_with >= rate_without + 0.3, (rate_with, rate_without)


# ---- steering decoding toward the words ------------------------------------------------------------------
class FakeTokens:
    """Spellings as a BPE might split them: " Loud" after one letter, " Lantern" after four."""
    PIECES = {" fox": [" fox"], " Fox": [" Fox"], " lantern": [" lan", "te", "rn"], " Lantern": [" Lant", "e", "rn"],
              " loud": [" loud"], " Loud": [" L", "oud"]}
    VOCAB = sorted({p for pieces in PIECES.values() for p in pieces})

    def encode(self, text: str) -> list[int]:
        return [self.VOCAB.index(p) for p in self.PIECES[text]]

    def decode(self, ids) -> str:
        return "".join(self.VOCAB[i] for i in ids)


def test_word_guide_boosts_unused_words_and_finishes_started_ones():
    tokens = FakeTokens()
    guide = instruct.WordGuide(tokens, ["fox", "lantern", "loud"], boost=5.0)
    fox, lantern, loud = (tokens.encode(" " + w) for w in ("fox", "lantern", "loud"))
    big_fox, big_lantern = tokens.encode(" Fox"), tokens.encode(" Lantern")
    first = {fox[0]: 5.0, big_fox[0]: 5.0, lantern[0]: 5.0, big_lantern[0]: 5.0, loud[0]: 5.0}
    assert guide.bias([]) == first  # each spelling's first token, but not " L" of " L" + "oud": it starts any L-name
    assert guide.bias([99, lantern[0]]) == {lantern[1]: 5.0}  # a started word is finished
    assert guide.bias([99, *lantern[:2]]) == {lantern[2]: 5.0}
    assert guide.bias([99, lantern[1]]) == guide.bias([])  # a middle token alone starts nothing
    guide.update("Once there was a fox")
    assert guide.unused == ["lantern", "loud"] and fox[0] not in guide.bias([]) and loud[0] in guide.bias([])
    guide.update("and two lanterns, loud ones.")  # an inflection uses the word too
    assert guide.unused == [] and guide.bias(lantern[:1]) == {}


def greedy_words(model_dir: Path, words: tuple[str, ...], boost: float) -> str:
    model, tokenizer = checkpoint.load(model_dir)
    engine = Engine(model, tokenizer, max_batch=1)
    seq = engine.add(tokenizer.encode("Once"), SamplingParams(max_new_tokens=60, temperature=0, stop_at_eot=False,
                                                              words=words, word_boost=boost))
    while not seq.finished:
        engine.step()
    return seq.text


def test_the_boost_writes_words_the_model_never_saw(story_model):
    words = ("lantern", "kite")  # not in the tiny model's corpus, and several tokens each in its 512-token BPE
    assert instruct.used_words(greedy_words(story_model, words, 0.0), words) == [False, False]
    steered = greedy_words(story_model, words, instruct.WORD_BOOST_RANGE[1])
    assert instruct.used_words(steered, words) == [True, True], steered


def test_bad_word_boost_is_refused():
    with pytest.raises(SlmError, match="word_boost must be between 0 and 20"):
        SamplingParams(words=("fox",), word_boost=21)
    with pytest.raises(SlmError, match="'f0x' is not a word"):
        SamplingParams(words=("f0x",))


# ---- asking for words: CLI and API -----------------------------------------------------------------------
def test_generate_words_builds_the_prompt(story_model):
    r = slm_cli("generate", "--model", str(story_model), "--words", "fox,cake", "--features", "dialogue",
                "--prompt", "Once", "--max-new-tokens", "20", "--temperature", "0", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["prompt"] == "Words: fox, cake\nFeatures: Dialogue\nStory:\nOnce"
    assert out["words"] == ["fox", "cake"] and len(out["words_used"]) == 2
    assert out["words_used"] == instruct.used_words(out["text"], ["fox", "cake"])


@pytest.mark.parametrize("args, message", [
    (["--words", "fox"], "was not trained to follow requests"),  # the plain model: no template
    (["--words", ",".join(["fox"] * 9)], "at most 8 words"),
    (["--words", "f0x"], "'f0x' is not a word"),
])
def test_generate_words_errors(trained, story_model, args, message):
    model = trained if "trained" in message else story_model
    r = slm_cli("generate", "--model", str(model), *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_api_words_change_the_prompt_and_show_it(story_model):
    from helpers import app_server

    head = "Words: fox, cake\nStory:\n"
    with app_server(story_model) as (url, _):
        r = httpx.post(f"{url}/predict", json={"input_text": "Once", "words": ["fox", "cake"], "temperature": 0,
                                               "max_new_tokens": 8})
        assert r.status_code == 200, r.text
        assert r.json()["prompt"] == head + "Once"
        plain = httpx.post(f"{url}/predict", json={"input_text": "Once", "temperature": 0, "max_new_tokens": 8})
        assert plain.json()["prompt"] == "Once"
        ids = Tokenizer.load(story_model).encode("Once")
        for prompt in ("Once", ids):
            r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "words": ["fox", "cake"],
                                                          "word_boost": 0, "temperature": 0, "max_tokens": 8})
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert choice["prompt"] == head + "Once"
            # The header reaches the model: the same as sending the whole prompt as text.
            whole = httpx.post(f"{url}/v1/completions", json={"prompt": head + "Once", "temperature": 0,
                                                              "max_tokens": 8})
            assert choice["text"] == whole.json()["choices"][0]["text"]
            assert r.json()["usage"]["prompt_tokens"] == whole.json()["usage"]["prompt_tokens"]
        steered = httpx.post(f"{url}/predict", json={"input_text": "Once", "words": ["lantern"], "word_boost": 20,
                                                     "temperature": 0, "max_new_tokens": 40})
        assert steered.status_code == 200 and steered.json()["settings"]["word_boost"] == 20
        assert instruct.used_words(steered.json()["result"], ["lantern"]) == [True], steered.text
        bad = httpx.post(f"{url}/v1/completions", json={"prompt": "Once", "words": ["fox"], "word_boost": 21})
        assert bad.status_code == 422 and "word_boost" in bad.text, bad.text


def test_only_a_story_end_is_learned(corpus, tmp_path):
    """A part cut from a longer story ends in <|endoftext|> as well, but the story goes on there: that end is left
    out of the loss, so the model does not learn to stop a story after a part's few sentences."""
    meta = prepare([corpus], tmp_path, vocab_size=512, val_fraction=0.1, progress=False, instruct="stories",
                   instruct_part_chars=150)
    tok = Tokenizer.load(tmp_path)
    tokens, mask = open_tokens(tmp_path, "train", meta), open_mask(tmp_path, "train")
    plain, copies = meta["sources"][0]["train"], meta["sources"][1]["train"]
    originals = tok.decode(tokens[plain[0] : plain[1]].tolist()).split("<|endoftext|>")[:-1]
    ends = [i for i in range(*copies) if tokens[i] == tok.eot_id]
    assert len(ends) > len(originals)  # the stories were cut into parts
    # Join the parts up to each learned end: that gives back the stories, so exactly their ends are learned.
    stories, story, start = [], [], copies[0]
    for end in ends:
        story.append(tok.decode(tokens[start:end].tolist()).split("Story:\n", 1)[1])
        if mask[end]:
            stories.append("\n\n".join(story))
            story = []
        start = end + 1
    assert stories == originals and story == []


def test_a_held_out_tails_head_does_not_end(corpus, tmp_path):
    """With the tail split each document's head is trained on and its tail held out: the <|endoftext|> after a
    head is not the document's end, so it is not learned (plain or instruct), while each tail's end is."""
    meta = prepare([corpus], tmp_path, vocab_size=512, val_fraction=0.1, progress=False, instruct="stories",
                   instruct_part_chars=150, split="tail")
    eot = Tokenizer.load(tmp_path).eot_id
    learned = {}
    for split in ("train", "val"):
        tokens, mask = open_tokens(tmp_path, split, meta), open_mask(tmp_path, split)
        for source, name in enumerate(("plain", "instruct")):
            ends = [i for i in range(*meta["sources"][source][split]) if tokens[i] == eot]
            learned[split, name] = (sum(int(mask[i]) for i in ends), len(ends))
    assert learned["train", "plain"][0] == 0 and learned["train", "instruct"][0] == 0
    assert learned["train", "plain"][1] > 0 and learned["train", "instruct"][1] > learned["train", "plain"][1]
    n_tails = learned["val", "plain"][1]
    assert learned["val", "plain"] == (n_tails, n_tails)  # every tail ends its document
    assert learned["val", "instruct"][0] == n_tails  # one end per tail: its last part's
