"""The slm playground (Streamlit): one prompt, the untrained / basic / cached models side by side, with times.

Run with `slm ui`. It talks to the API over HTTP (SLM_API_URL, default http://127.0.0.1:8000): basic and
untrained answers come from /predict, the cached answer streams token by token from /v1/completions.
Times and the KV-cache speedup are the server's own generation times for both, so they compare like with like.
Model output is shown as plain text after the prompt (never rendered as Markdown).
"""

from __future__ import annotations

import html
import json
import os
import time

import httpx
import pandas as pd
import streamlit as st

API_URL = os.environ.get("SLM_API_URL", "http://127.0.0.1:8000").rstrip("/")
# Chosen by measurement on the bundled model: the fewest repeats for the least held-out likelihood lost
# (docs/api.md, "Repetition control").
REPETITION_DEFAULT = 1.1
TEMPERATURE_DEFAULT = 0.8
MAX_NEW_DEFAULT = 100
# Starting points for the prompt box; the model card's samples and tools/bundled_model.py use the same ones.
EXAMPLE_PROMPTS = ["Once upon a time", "The little rabbit", "A little girl went to the woods",
                   "The king had three sons", "One day, a fox"]
API_KEY = os.environ.get("SLM_API_KEY", "")
LABELS = {"untrained": "Untrained (random weights)", "basic": "Trained, no KV cache", "cached": "Trained + KV cache"}
ORDER = ["untrained", "basic", "cached"]
CONTROLS = ("repetition_penalty", "frequency_penalty", "presence_penalty")
REDRAW_SECONDS = 0.05  # the streamed text is redrawn at most this often: a redraw a token took the cores from the model


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


def predict(model_type: str, prompt: str, settings: dict, story: dict) -> dict:
    r = httpx.post(f"{API_URL}/predict", json={"input_text": prompt, "model_type": model_type, **settings, **story},
                   headers=headers(), timeout=300)
    check(r)
    return r.json()


def show(placeholder, prompt: str, text: str, cursor: bool = False) -> None:
    """The prompt (grey) and the continuation as plain text: escaped, so `*` or `#` stay characters."""
    def escape(s: str) -> str:
        return html.escape(s).replace("\n", "<br>")

    placeholder.markdown(f'<div class="slm-text"><span style="color:#888">{escape(prompt)}</span>'
                         f'{escape(text)}{"▌" if cursor else ""}</div>', unsafe_allow_html=True)


def stream_cached(prompt: str, settings: dict, story: dict, placeholder) -> dict:
    """Stream the cached model's answer into `placeholder`; returns the same fields as /predict."""
    controls = {k: settings[k] for k in CONTROLS}
    body = {"prompt": prompt, "max_tokens": settings["max_new_tokens"], "temperature": settings["temperature"],
            "top_p": settings["top_p"] or 1.0, "top_k": settings["top_k"], "seed": settings["seed"], "stream": True,
            **controls, **story}
    text, usage, reason, timing, drawn = "", {}, None, {}, 0.0
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
            prompt = choice.get("prompt", prompt)  # with words: the server's whole prompt, in the first event
            text += choice["text"]
            reason = choice["finish_reason"] or reason
            usage = event.get("usage", usage)
            timing = event.get("timing", timing)
            if time.monotonic() - drawn >= REDRAW_SECONDS:
                show(placeholder, prompt, text, cursor=True)
                drawn = time.monotonic()
    show(placeholder, prompt, text)
    return {"result": text, "time": timing.get("seconds", 0.0), "generated_tokens": usage.get("completion_tokens", 0),
            "tokens_per_second": timing.get("tokens_per_second", 0.0), "finish_reason": reason}


def story_request() -> dict:
    """The words (and features) the story should have: the API's "words" and "features" fields."""
    words = st.text_input("Words to use (optional, comma-separated)", "", key="words",
                          help="for models trained on requests (slm prepare --instruct): the story should use them "
                          "(the header asks for them; decoding steers toward them until used)")
    dialogue = st.checkbox("with dialogue", key="dialogue")
    story = {"words": [w.strip() for w in words.split(",") if w.strip()]}
    if dialogue:
        story["features"] = ["dialogue"]
    return story if story["words"] or dialogue else {}


def sidebar() -> dict:
    st.sidebar.header("Generation settings")
    max_new = st.sidebar.slider("Max new tokens", 1, 512, MAX_NEW_DEFAULT, key="max_new_tokens")
    temperature = st.sidebar.slider("Temperature (0 = greedy)", 0.0, 2.0, TEMPERATURE_DEFAULT, 0.05,
                                    key="temperature")
    top_k = st.sidebar.slider("Top-k (0 = off)", 0, 200, 0, key="top_k")
    top_p = st.sidebar.slider("Top-p", 0.05, 1.0, 1.0, 0.05, key="top_p")
    seed = st.sidebar.number_input("Seed (same seed, same text)", 0, 2**31 - 1, 42, key="seed")
    st.sidebar.subheader("Repetition control")
    repetition = st.sidebar.slider("Repetition penalty (1 = off)", 1.0, 2.0, REPETITION_DEFAULT, 0.05,
                                   key="repetition_penalty",
                                   help="> 1 makes tokens already in the prompt or the answer less likely")
    frequency = st.sidebar.slider("Frequency penalty", -2.0, 2.0, 0.0, 0.1, key="frequency_penalty",
                                  help="lowers a token's score by this much for every time it was generated")
    presence = st.sidebar.slider("Presence penalty", -2.0, 2.0, 0.0, 0.1, key="presence_penalty",
                                 help="lowers a token's score by this much once it has been generated")
    st.sidebar.caption(f"API: {API_URL}")
    return {"max_new_tokens": int(max_new), "temperature": float(temperature), "top_k": int(top_k) or None,
            "top_p": float(top_p) if top_p < 1.0 else None, "seed": int(seed),
            "repetition_penalty": float(repetition), "frequency_penalty": float(frequency),
            "presence_penalty": float(presence)}


def use_example() -> None:
    """Put the chosen example into the prompt box (a callback: it runs before the box is drawn again)."""
    if st.session_state.example:
        st.session_state.prompt = st.session_state.example


def prompt_box() -> str:
    st.selectbox("Example prompts", EXAMPLE_PROMPTS, index=None, placeholder="start from an example...",
                 key="example", on_change=use_example)
    st.session_state.setdefault("prompt", EXAMPLE_PROMPTS[0])  # set here, not as the widget's value: see use_example
    return st.text_area("Prompt", key="prompt", height=100)


def main() -> None:
    st.set_page_config(page_title="slm playground", page_icon="📖", layout="wide")
    st.title("slm playground")
    st.caption("A small GPT trained from scratch, the one the API serves. Compare an untrained model of its "
               "shape, the trained model without a KV cache, and the same model with one.")
    settings = sidebar()
    prompt = prompt_box()
    story = story_request()
    chosen = st.multiselect("Models", ORDER, default=["basic", "cached"], format_func=lambda m: LABELS[m],
                            key="models")
    if not st.button("Run", type="primary", key="run"):
        return
    if not prompt.strip() and not story:  # with words, the request alone is a prompt
        st.warning("Type a prompt first, or words for a story.")
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
                    out = stream_cached(prompt, settings, story, box)
                else:
                    with st.spinner("generating..."):
                        out = predict(model_type, prompt, settings, story)
                    show(box, out["prompt"], out["result"])
            except (httpx.HTTPError, ApiError) as e:
                box.error(describe(e))
                continue
            results[model_type] = out
            st.caption(f"{out['time']:.2f} s · {out['generated_tokens']} tokens · "
                       f"{out['tokens_per_second']:.1f} tokens/s")
    if "basic" in results and "cached" in results:
        basic, cached = results["basic"], results["cached"]
        speedup = basic["time"] / cached["time"] if cached["time"] else float("nan")
        st.metric("KV cache speedup", f"{speedup:.1f}x",
                  help="generation time without the cache / with it, both measured in the server")
        chart = pd.DataFrame({"seconds": [basic["time"], cached["time"]]},
                             index=[LABELS["basic"], LABELS["cached"]])
        st.bar_chart(chart, horizontal=True)


if __name__ == "__main__":  # streamlit runs the file as __main__; benchmarks import it for the defaults above
    main()
