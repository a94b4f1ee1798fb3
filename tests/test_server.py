"""The HTTP contract against a real `slm serve` on a free port on 127.0.0.1, one per model family (faults and
overload, each with its own server: tests/test_server_limits.py)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from conftest import slm_cli
from helpers import finished_total, post, server, wait_for_cancel


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def served(request):
    """The checkpoint the module's server runs: each family's briefly trained tiny model in turn."""
    return request.getfixturevalue("trained" if request.param == "gpt2" else "trained_llama")


@pytest.fixture(scope="module")
def api(served):
    with server(served, max_new_tokens=100_000) as url:  # room for generations only a disconnect ends
        yield url


def test_root_health_models_metrics(api):
    root = httpx.get(api).json()
    assert root["name"] == "slm" and root["model"]["parameters"] > 1e5 and root["device"] == "cpu"
    assert "path" not in root["model"] and "/" not in json.dumps(root["model"])  # GET / is open: no file paths
    assert httpx.get(f"{api}/health").json()["status"] == "ok"
    models = httpx.get(f"{api}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "best"
    post(api, "/predict", {"input_text": "Once", "max_new_tokens": 5})
    text = httpx.get(f"{api}/metrics").text
    for name in ("slm_requests_total", "slm_generated_tokens_total", "slm_request_latency_seconds",
                 "slm_queue_depth", "slm_batch_size"):
        assert name in text
    assert httpx.get(f"{api}/openapi.json").json()["paths"]["/predict"]


def metric_series(api: str, name: str) -> list[str]:
    return [line for line in httpx.get(f"{api}/metrics").text.splitlines() if line.startswith(name + "{")]


def test_metrics_label_by_route_not_by_url(api):
    """40 random URLs add no new series: unknown paths are counted under one label, "other"."""
    httpx.get(f"{api}/no-such-page")
    before = metric_series(api, "slm_requests_total")
    with httpx.Client() as client:  # one kept-alive connection for the 40
        for i in range(40):
            assert client.get(f"{api}/probe-{i}/{i * 7}").status_code == 404
    after = metric_series(api, "slm_requests_total")
    assert len(after) == len(before)
    assert any('endpoint="other",status="404"' in line for line in after)
    assert not any("probe-" in line for line in after)
    post(api, "/predict", {"input_text": "Once", "max_new_tokens": 2})
    assert any('endpoint="/predict",status="200"' in line for line in metric_series(api, "slm_requests_total"))


def test_greedy_text_is_the_same_everywhere(api, served):
    prompt = "Once upon a time there was"
    body = {"input_text": prompt, "temperature": 0, "max_new_tokens": 40}
    basic = post(api, "/predict", {**body, "model_type": "basic"}).json()
    cached = post(api, "/predict", {**body, "model_type": "cached"}).json()
    completion = post(api, "/v1/completions", {"prompt": prompt, "temperature": 0, "max_tokens": 40}).json()
    cli = json.loads(slm_cli("generate", "--model", str(served), "--prompt", prompt, "--temperature", "0",
                             "--max-new-tokens", "40", "--json").stdout)
    assert basic["result"] == cached["result"] == completion["choices"][0]["text"] == cli["text"]
    assert basic["result"].strip()
    assert cached["generated_tokens"] == cli["generated_tokens"] and cached["tokens_per_second"] > 0
    assert cached["settings"]["kv_cache"] is True and basic["settings"]["kv_cache"] is False
    assert completion["usage"]["completion_tokens"] == cli["generated_tokens"]


def test_repetition_controls_reach_the_engine(api, served):
    prompt = "Once upon a time"
    controls = {"repetition_penalty": 1.5, "frequency_penalty": 0.5}
    body = {"input_text": prompt, "temperature": 0, "max_new_tokens": 40}
    plain = post(api, "/predict", body).json()
    penalised = post(api, "/predict", {**body, **controls}).json()
    completion = post(api, "/v1/completions", {"prompt": prompt, "temperature": 0, "max_tokens": 40, **controls})
    cli = json.loads(slm_cli("generate", "--model", str(served), "--prompt", prompt, "--temperature", "0",
                             "--max-new-tokens", "40", "--repetition-penalty", "1.5", "--frequency-penalty", "0.5",
                             "--json").stdout)
    assert penalised["result"] == completion.json()["choices"][0]["text"] == cli["text"] != plain["result"]
    assert penalised["settings"]["repetition_penalty"] == 1.5 and penalised["settings"]["frequency_penalty"] == 0.5


def test_untrained_model_answers_differently(api):
    body = {"input_text": "Once upon a time", "temperature": 0, "max_new_tokens": 20}
    untrained = post(api, "/predict", {**body, "model_type": "untrained"}).json()
    cached = post(api, "/predict", {**body, "model_type": "cached"}).json()
    assert untrained["model_type"] == "untrained" and untrained["result"] != cached["result"]


def test_seeded_sampling_repeats(api):
    body = {"input_text": "One day", "temperature": 1.0, "top_k": 40, "top_p": 0.9, "seed": 11, "max_new_tokens": 30}
    a, b = post(api, "/predict", body).json(), post(api, "/predict", body).json()
    assert a["result"] == b["result"]


def test_streaming_sends_one_event_per_token_then_done(api):
    body = {"prompt": "Once upon a time", "temperature": 0, "max_tokens": 12, "stream": True}
    with httpx.stream("POST", f"{api}/v1/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["usage"]["completion_tokens"] == 12
    assert events[-1]["timing"]["seconds"] > 0 and events[-1]["timing"]["tokens_per_second"] > 0  # server-side
    pieces = [e["choices"][0]["text"] for e in events[:-1]]
    assert len(pieces) >= 10  # one event per token (a token that only starts a character waits for the next)
    whole = post(api, "/v1/completions", {**body, "stream": False}).json()["choices"][0]["text"]
    assert "".join(pieces) == whole


def test_openai_client(api):
    from openai import OpenAI

    client = OpenAI(base_url=f"{api}/v1", api_key="unused")
    out = client.completions.create(model="best", prompt="Once upon a time", max_tokens=10, temperature=0)
    assert out.choices[0].text and out.usage.completion_tokens == 10
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="best", prompt="Once upon a time", max_tokens=10, temperature=0, stream=True))
    assert streamed == out.choices[0].text
    stopped = client.completions.create(model="best", prompt="Once upon a time", max_tokens=50, temperature=0,
                                        stop=["."])
    assert "." not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("path, body, field", [
    ("/predict", {"input_text": "", "model_type": "cached"}, "input_text"),
    ("/predict", {"input_text": "hi", "model_type": "turbo"}, "model_type"),
    ("/predict", {"input_text": "hi", "temperature": -0.5}, "temperature"),
    ("/predict", {"input_text": "hi", "top_p": 0}, "top_p"),
    ("/predict", {"input_text": "hi", "top_p": 1.5}, "top_p"),
    ("/predict", {"input_text": "hi", "top_k": -1}, "top_k"),
    ("/predict", {"input_text": "hi", "max_new_tokens": 0}, "max_new_tokens"),
    ("/predict", {"input_text": "hi", "max_new_tokens": 10**6}, "max_new_tokens"),
    ("/predict", {"input_text": "hi", "unknown": 1}, "unknown"),
    ("/predict", {"input_text": "x" * 30_000}, "input_text"),
    ("/predict", {"input_text": 5}, "input_text"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], []]}, "prompt"),
    ("/v1/completions", {"prompt": ["a"] * 33}, "prompt"),
    ("/v1/completions", {"prompt": [5, 10**6]}, "prompt"),  # a token id outside the vocabulary
    ("/v1/completions", {"prompt": [[5], [-1]]}, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"], "stream": True}, "stream"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 1, "stream": True}, "stream"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "n": 2}, "n"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/predict", {"input_text": "hi", "frequency_penalty": 2.5}, "frequency_penalty"),
    ("/predict", {"input_text": "hi", "repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"prompt": "hi", "min_p": 1.5}, "min_p"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": -3}, "presence_penalty"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 6}, "logprobs"),
    ("/detokenize", {"tokens": [10**6]}, "tokens"),
    ("/v1/completions", {"prompt": "a\ud800b"}, "prompt"),  # a lone surrogate: not encodable as UTF-8
    ("/v1/completions", {"prompt": ["ok", "a\ud800b"]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "stop": "a\udfffb"}, "stop"),
    ("/predict", {"input_text": "a\ud800b"}, "input_text"),
    ("/tokenize", {"prompt": "a\ud800b"}, "prompt"),
    ("/v1/completions", {"prompt": [5] * 20_000, "max_tokens": 0, "echo": True, "logprobs": 5}, "prompt"),
    ("/v1/completions", {"prompt": [[5] * 9_000, [5] * 9_000], "max_tokens": 1}, "prompt"),  # 16,384 in all
    ("/v1/completions", {"prompt": "hi", "stop": "x" * 201}, "stop"),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 1e-300}, "repetition_penalty"),
    ("/v1/completions", {"prompt": "hi", "temperature": 1e300}, "temperature"),
    ("/predict", {"input_text": "hi", "words": ["cat"]}, "words"),  # the tiny model has no template
    ("/v1/completions", {"prompt": "hi", "features": ["dialogue"]}, "features"),
    ("/v1/completions", {"prompt": "hi", "words": ["a"] * 9}, "words"),
    ("/v1/completions", {"prompt": "hi", "words": ["b@d"]}, "words"),
    ("/predict", {"input_text": "hi", "words": ["cat", "two words"]}, "words"),
    ("/v1/completions", {"prompt": "hi", "features": ["twist"]}, "features"),
])
def test_bad_requests_get_422_naming_the_field(api, path, body, field):
    r = post(api, path, body)
    assert r.status_code == 422, r.text
    assert field in r.json()["detail"]
    assert all(set(e) == {"field", "message"} for e in r.json()["errors"])  # the documented ErrorResponse


# The engine's sampling at every extreme its bounds allow (and the four requests that once killed it).
EXTREMES = [
    ("/v1/completions", {"temperature": 0.8, "top_p": 1e-50}),
    ("/v1/completions", {"temperature": 1e-40}),
    ("/v1/completions", {"temperature": 0.8, "repetition_penalty": 1e-300}),
    ("/predict", {"temperature": 1e-40, "model_type": "basic"}),
    ("/v1/completions", {"temperature": 5e-324, "top_p": 5e-324, "min_p": 5e-324}),  # 0 in float32: refused
    ("/v1/completions", {"temperature": 1e-4, "top_p": 5e-324, "min_p": 5e-324}),
    ("/v1/completions", {"temperature": 1e-38, "repetition_penalty": 0.01, "frequency_penalty": -2,
                         "presence_penalty": -2}),
    ("/v1/completions", {"temperature": 5.0, "repetition_penalty": 10, "frequency_penalty": 2, "presence_penalty": 2,
                         "min_p": 1.0}),
    ("/v1/completions", {"temperature": 5.0, "top_k": 10**18, "top_p": 1.0}),
    ("/predict", {"temperature": 1e-45, "top_k": 1, "top_p": 1e-45, "model_type": "untrained"}),
]


def test_no_sampling_setting_breaks_the_engine(api):
    for path, settings in EXTREMES:
        prompt = {"input_text": "Once upon a time", "max_new_tokens": 8} if path == "/predict" else \
            {"prompt": "Once upon a time", "max_tokens": 8}
        r = post(api, path, {**prompt, **settings})
        assert r.status_code in (200, 422), (settings, r.text)
    r = post(api, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0.8})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
    health = httpx.get(f"{api}/health").json()
    assert health["status"] == "ok" and health["engine_restarts"] == 0


def test_prompt_forms_give_choices_in_order(api):
    """OpenAI's four prompt forms: a string, strings, token ids, lists of token ids."""
    texts = ["Once upon a time", "The little fox", "One day"]
    ids = [post(api, "/tokenize", {"prompt": t}).json()["tokens"] for t in texts]
    greedy = {"temperature": 0, "max_tokens": 8}
    alone = [post(api, "/v1/completions", {"prompt": t, **greedy}).json()["choices"][0]["text"] for t in texts]
    for prompt in (texts, ids):
        out = post(api, "/v1/completions", {"prompt": prompt, **greedy}).json()
        assert [c["index"] for c in out["choices"]] == [0, 1, 2]
        assert [c["text"] for c in out["choices"]] == alone
        assert out["usage"]["prompt_tokens"] == sum(map(len, ids)) and out["usage"]["completion_tokens"] == 24
    one = post(api, "/v1/completions", {"prompt": ids[1], **greedy}).json()
    assert len(one["choices"]) == 1 and one["choices"][0]["text"] == alone[1]


def test_tokenizer_endpoints(api, served):
    from slm.checkpoint import load

    _, tokenizer = load(served)
    text = "Once upon a time, a fox."
    out = post(api, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()
    assert out["tokens"] == tokenizer.encode(text) and out["count"] == len(out["tokens"]) and out["max_model_len"] > 0
    assert post(api, "/detokenize", {"tokens": out["tokens"]}).json()["prompt"] == text
    info = httpx.get(f"{api}/tokenizer_info").json()
    assert post(api, "/tokenize", {"prompt": info["eos_token"]}).json()["tokens"] == [tokenizer.eot_id]


def test_echo_logprobs_are_the_models_own(api, served):
    """echo + logprobs with max_tokens 0 scores a text: the same numbers as slm eval's forward pass, also
    past the context (sliding window)."""
    from slm.checkpoint import load
    from slm.evaluate import score_token_logprobs, score_tokens

    model, tokenizer = load(served)
    text = "Once upon a time there was a little fox named Tom. He went to the woods. " * 8
    ids = tokenizer.encode(text)
    assert len(ids) > 2 * model.config.context_length
    out = post(api, "/v1/completions", {"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 2}).json()
    lp = out["choices"][0]["logprobs"]
    assert out["choices"][0]["text"] == text and out["usage"]["completion_tokens"] == 0
    assert len(lp["tokens"]) == len(ids) and "".join(lp["tokens"]) == text
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    expected = score_token_logprobs(model, ids, 2)
    assert lp["token_logprobs"][1:] == pytest.approx(expected.logprobs, abs=1e-4)
    nll, count = score_tokens(model, ids)
    assert -sum(lp["token_logprobs"][1:]) == pytest.approx(nll, abs=1e-3) and count == len(ids) - 1
    for token, chosen, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True):
        assert token in top and top[token] == chosen and 1 <= len(top) <= 3
        assert max(top.values()) >= chosen and all(v <= 0 for v in top.values())
    assert all(text[o:].startswith(t) for o, t in zip(lp["text_offset"], lp["tokens"], strict=True))


def test_generation_logprobs(api):
    prompt = "Once upon a time"
    out = post(api, "/v1/completions", {"prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 1,
                                        "ignore_eos": True}).json()
    choice = out["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == 6 and "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"][0] == 0
    for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert chosen == max(top.values())  # greedy: the chosen token is the most likely one
    echoed = post(api, "/v1/completions", {"prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 1,
                                           "ignore_eos": True, "echo": True}).json()["choices"][0]
    assert echoed["text"] == prompt + choice["text"]
    assert echoed["logprobs"]["token_logprobs"][-6:] == pytest.approx(lp["token_logprobs"], abs=1e-5)


def test_malformed_bodies(api):
    json_type = {"content-type": "application/json"}
    r = httpx.post(f"{api}/predict", content=b"{not json", headers=json_type)
    assert r.status_code == 422
    error = r.json()
    assert error["errors"][0]["field"] == "body" and error["detail"].startswith("body: invalid JSON at position 1")
    r = httpx.post(f"{api}/predict", content=b"x" * 2_000_000, headers=json_type)
    assert r.status_code == 413
    r = httpx.post(f"{api}/v1/completions", content=b'{"prompt": "\xff\xfe"}', headers=json_type)
    assert r.status_code == 422 and "UTF-8" in r.json()["detail"] and r.json()["errors"][0]["field"] == "body"
    r = httpx.post(f"{api}/v1/completions", content=b"[" * 100_000 + b"]" * 100_000, headers=json_type)
    assert r.status_code == 422 and "nested too deeply" in r.json()["detail"]
    assert httpx.get(f"{api}/health").status_code == 200  # still alive


def test_chunked_body_over_the_limit_gets_413(api):
    """No Content-Length to check: the limit holds on the bytes as they arrive."""
    def chunks():
        for _ in range(40):  # 2.6 MB, over the 1 MB limit
            yield b" " * 65536

    r = httpx.post(f"{api}/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over 1000000 bytes" in r.json()["detail"]
    small = b'{"prompt": "Once", "max_tokens": 2}'
    r = httpx.post(f"{api}/v1/completions", content=iter([small[:10], small[10:]]),
                   headers={"content-type": "application/json"})
    assert r.status_code == 200  # a chunked body under the limit is read as before


def test_sixteen_concurrent_requests_each_get_what_they_get_alone(api):
    prompts = [f"Once upon a time there was a little {w}" for w in
               ["rabbit", "fox", "bear", "duck", "mouse", "cat", "dog", "owl"]] * 2
    lengths = [10 + 5 * i for i in range(16)]
    alone = [post(api, "/predict", {"input_text": p, "temperature": 0, "max_new_tokens": n})
             .json()["result"] for p, n in zip(prompts, lengths, strict=True)]

    async def flood():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*[
                client.post(f"{api}/predict", json={"input_text": p, "temperature": 0, "max_new_tokens": n})
                for p, n in zip(prompts, lengths, strict=True)])

    responses = asyncio.run(flood())
    assert all(r.status_code == 200 for r in responses)
    assert [r.json()["result"] for r in responses] == alone


def test_disconnect_cancels_streamed_generation(api):
    before = finished_total(api, "cancelled")
    # ignore_eos: only the length limit (minutes away) or the disconnect can end this generation
    body = {"prompt": "Once", "max_tokens": 100_000, "temperature": 1.0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{api}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for i, _ in enumerate(r.iter_lines()):
            if i > 6:
                break  # leave after a few tokens: closing the connection must stop the generation
    assert wait_for_cancel(api, before) == before + 1
    assert httpx.get(f"{api}/health").json()["queue_depth"] == 0


def test_ignore_eos_generates_exactly_max_tokens(api):
    body = {"prompt": "Once upon a time", "max_tokens": 200, "temperature": 1.0, "seed": 3, "ignore_eos": True}
    out = post(api, "/v1/completions", body).json()
    assert out["usage"]["completion_tokens"] == 200 and out["choices"][0]["finish_reason"] == "length"
