"""lm-evaluation-harness as a real client of `slm serve`: its `local-completions` model sends token-id prompts,
several per request, with echo and logprobs, and tokenizes through the server's /tokenize. Tasks are local
files the test writes; nothing comes from the network."""

from __future__ import annotations

import json
import math
import random

import pytest

from conftest import ANIMALS, NAMES, PLACES, THINGS
from helpers import server

pytestmark = pytest.mark.slow
ENDINGS = ["sun went down.", "\"What a nice thing!\"", "little fox named Tom.", "very happy."]


def story_items(n: int = 20, seed: int = 3) -> list[dict]:
    """"Which ending fits the story": the place a story's thing was found in, against three other endings."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        animal, name, place, thing = (rng.choice(x) for x in (ANIMALS, NAMES, PLACES, THINGS))
        context = (f"Once upon a time there was a little {animal} named {name}. {name} lived near the {place}.\n\n"
                   f"One day {name} found {thing} in the")
        choices = [f"{place}.", *rng.sample(ENDINGS, 3)]
        order = list(range(4))
        rng.shuffle(order)
        items.append({"context": context, "choices": [choices[i] for i in order], "label": order.index(0)})
    return items


def write_tasks(directory, items: list[dict], text: str) -> None:
    (directory / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")
    (directory / "text.jsonl").write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
    (directory / "endings.yaml").write_text(f"""task: slm_story_endings
dataset_path: json
dataset_kwargs:
  data_files:
    test: {directory / 'items.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
""", encoding="utf-8")
    (directory / "perplexity.yaml").write_text(f"""task: slm_text_perplexity
dataset_path: json
dataset_kwargs:
  data_files:
    test: {directory / 'text.jsonl'}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
""", encoding="utf-8")


def direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """What lm-eval asks for, computed on the model in this process: log p(continuation | context), with the
    continuation's tokens taken from the whole string's encoding (lm-eval's _encode_pair)."""
    from slm.evaluate import score_token_logprobs

    whole, ctx = tokenizer.encode(context + continuation), tokenizer.encode(context)
    logprobs = score_token_logprobs(model, whole).logprobs  # logprobs[j - 1] is token j's
    return math.fsum(logprobs[len(ctx) - 1 :])


def test_lm_eval_local_completions_against_a_live_server(trained, tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from slm.checkpoint import load
    from slm.evaluate import evaluate_text

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, tokenizer = load(trained)
    items = story_items()
    text = "Once upon a time there was a little owl named Sue. Sue lived near the river."
    assert len(tokenizer.encode(text)) + 1 < model.config.context_length  # one window: see docs/serving.md
    write_tasks(tmp_path, items, text)

    with server(trained) as url:
        results = simple_evaluate(
            model="local-completions",
            model_args=f"base_url={url}/v1/completions,model=slm,tokenizer_backend=remote,tokenized_requests=True,"
                       f"max_length={model.config.context_length + 1},batch_size=8,num_concurrent=1,max_retries=1",
            tasks=["slm_story_endings", "slm_text_perplexity"],
            task_manager=TaskManager(include_path=str(tmp_path)),
            log_samples=True,
        )

    # Multiple choice: lm-eval's per-choice log-likelihoods and accuracy equal the model's own.
    samples = sorted(results["samples"]["slm_story_endings"], key=lambda s: s["doc_id"])
    assert len(samples) == len(items)
    correct = 0
    for item, sample in zip(items, samples, strict=True):
        direct = [direct_loglikelihood(model, tokenizer, item["context"], " " + c) for c in item["choices"]]
        served = [resp[0][0] for resp in sample["resps"]]
        assert served == pytest.approx(direct, abs=1e-3)
        correct += max(range(4), key=direct.__getitem__) == item["label"]
    acc = results["results"]["slm_story_endings"]["acc,none"]
    served_bpb = results["results"]["slm_text_perplexity"]["bits_per_byte,none"]
    expected = evaluate_text(model, tokenizer, [text])["bits_per_byte"]
    print(f"lm-eval accuracy {acc:.3f}, direct {correct / len(items):.3f}; "
          f"rolling bits/byte {served_bpb:.5f}, slm eval {expected:.5f}")
    assert acc == correct / len(items)
    assert acc > 0.25  # the tiny model learned where things are found: better than chance

    # Rolling log-likelihood of a text: the same bits per byte as `slm eval` gives for it.
    assert served_bpb == pytest.approx(expected, abs=1e-3)
