"""The slm playground (Streamlit): one prompt, the untrained / basic / cached models side by side, with times.

Run with `slm ui`. It talks to the API over HTTP (SLM_API_URL, default http://127.0.0.1:8000): basic and
untrained answers come from /predict, the cached answer streams token by token from /v1/completions.
"""

from __future__ import annotations

import json
import os
import time

import httpx
import pandas as pd
import streamlit as st

API_URL = os.environ.get("SLM_API_URL", "http://127.0.0.1:8000").rstrip("/")
API_KEY = os.environ.get("SLM_API_KEY", "")
LABELS = {"untrained": "Untrained (random weights)", "basic": "Trained, no KV cache", "cached": "Trained + KV cache"}
ORDER = ["untrained", "basic", "cached"]


class ApiError(Exception):
    pass


def headers() -> dict:
    return {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}


def describe(exc: Exception) -> str:
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return f"Cannot reach the API at {API_URL}. Start it with `slm serve` (or set SLM_API_URL)."
    if isinstance(exc, httpx.TimeoutException):
        return f"The API at {API_URL} did not answer in time."
    return str(exc)


def check(response: httpx.Response) -> None:
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise ApiError(f"API error {response.status_code}: {detail}")


def predict(model_type: str, prompt: str, settings: dict) -> dict:
    r = httpx.post(f"{API_URL}/predict", json={"input_text": prompt, "model_type": model_type, **settings},
                   headers=headers(), timeout=300)
    check(r)
    return r.json()


def stream_cached(prompt: str, settings: dict, placeholder) -> dict:
    """Stream the cached model's answer into `placeholder`; returns the same fields as /predict."""
    body = {"prompt": prompt, "max_tokens": settings["max_new_tokens"], "temperature": settings["temperature"],
            "top_p": settings["top_p"] or 1.0, "top_k": settings["top_k"], "seed": settings["seed"], "stream": True}
    text, usage, reason = "", {}, None
    started = time.perf_counter()
    with httpx.stream("POST", f"{API_URL}/v1/completions", json=body, headers=headers(), timeout=300) as r:
        if r.status_code >= 400:
            r.read()
            check(r)
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise ApiError(event["error"]["message"])
            choice = event["choices"][0]
            text += choice["text"]
            reason = choice["finish_reason"] or reason
            usage = event.get("usage", usage)
            placeholder.markdown(text + "▌")
    seconds = time.perf_counter() - started
    placeholder.markdown(text)
    n = usage.get("completion_tokens", 0)
    return {"result": text, "time": round(seconds, 4), "generated_tokens": n,
            "tokens_per_second": round(n / seconds, 2) if seconds else 0.0, "finish_reason": reason}


def sidebar() -> dict:
    st.sidebar.header("Generation settings")
    max_new = st.sidebar.slider("Max new tokens", 1, 512, 100, key="max_new_tokens")
    temperature = st.sidebar.slider("Temperature (0 = greedy)", 0.0, 2.0, 0.8, 0.05, key="temperature")
    top_k = st.sidebar.slider("Top-k (0 = off)", 0, 200, 0, key="top_k")
    top_p = st.sidebar.slider("Top-p", 0.05, 1.0, 1.0, 0.05, key="top_p")
    seed = st.sidebar.number_input("Seed (same seed, same text)", 0, 2**31 - 1, 42, key="seed")
    st.sidebar.caption(f"API: {API_URL}")
    return {"max_new_tokens": int(max_new), "temperature": float(temperature), "top_k": int(top_k) or None,
            "top_p": float(top_p) if top_p < 1.0 else None, "seed": int(seed)}


def main() -> None:
    st.set_page_config(page_title="slm playground", page_icon="📖", layout="wide")
    st.title("slm playground")
    st.caption("A 16M-parameter GPT trained from scratch. Compare an untrained model, the trained model "
               "without a KV cache, and the same model with one.")
    settings = sidebar()
    prompt = st.text_area("Prompt", "Once upon a time", key="prompt", height=100)
    chosen = st.multiselect("Models", ORDER, default=["basic", "cached"], format_func=lambda m: LABELS[m],
                            key="models")
    if not st.button("Run", type="primary", key="run"):
        return
    if not prompt.strip():
        st.warning("Type a prompt first.")
        return
    if not chosen:
        st.warning("Choose at least one model.")
        return
    results: dict[str, dict] = {}
    columns = st.columns(len(chosen))
    for column, model_type in zip(columns, [m for m in ORDER if m in chosen], strict=True):
        with column:
            st.subheader(LABELS[model_type])
            box = st.empty()
            try:
                if model_type == "cached":
                    out = stream_cached(prompt, settings, box)
                else:
                    with st.spinner("generating..."):
                        out = predict(model_type, prompt, settings)
                    box.markdown(out["result"])
            except (httpx.HTTPError, ApiError) as e:
                box.error(describe(e))
                continue
            results[model_type] = out
            st.caption(f"{out['time']:.2f} s · {out['generated_tokens']} tokens · "
                       f"{out['tokens_per_second']:.1f} tokens/s")
    if "basic" in results and "cached" in results:
        basic, cached = results["basic"], results["cached"]
        speedup = basic["time"] / cached["time"] if cached["time"] else float("nan")
        st.metric("KV cache speedup", f"{speedup:.1f}x", help="time without the cache / time with it")
        chart = pd.DataFrame({"seconds": [basic["time"], cached["time"]]},
                             index=[LABELS["basic"], LABELS["cached"]])
        st.bar_chart(chart, horizontal=True)


main()
