"""Exercise the running compose stack: the API's endpoints, then the UI in headless Chromium."""

from __future__ import annotations

import json
import sys

import httpx
from playwright.sync_api import sync_playwright

api, ui = sys.argv[1], sys.argv[2]


def check(cond: bool, what: str) -> None:
    if not cond:
        sys.exit(f"docker smoke test FAILED: {what}")
    print(f"ok: {what}")


check(httpx.get(f"{api}/health", timeout=10).json()["status"] == "ok", "GET /health")
check(httpx.get(f"{api}/", timeout=10).json()["model"]["native_decode"] is True,
      "GET / says the cached model decodes with the native step (compiled in the container)")
for model_type in ("untrained", "basic", "cached"):
    r = httpx.post(f"{api}/predict", json={"input_text": "Once upon a time", "model_type": model_type,
                                           "temperature": 0, "max_new_tokens": 20}, timeout=120)
    check(r.status_code == 200 and r.json()["generated_tokens"] > 0, f"POST /predict {model_type}")
body = {"prompt": "Once upon a time", "max_tokens": 10, "temperature": 0, "stream": True}
with httpx.stream("POST", f"{api}/v1/completions", json=body, timeout=120) as r:
    lines = [line for line in r.iter_lines() if line]
events = [json.loads(line[6:]) for line in lines[:-1]]
check(lines[-1] == "data: [DONE]" and len(events) >= 5, "POST /v1/completions stream")

with sync_playwright() as p:
    browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
        "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"])
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(ui, timeout=60_000)
    box = page.get_by_label("Prompt", exact=True)  # not "Example prompts"
    box.wait_for(timeout=60_000)
    box.fill("The little rabbit")
    box.press("Control+Enter")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("KV cache speedup").wait_for(timeout=120_000)
    check("tokens/s" in page.inner_text("body"), "UI container answers a prompt in Chromium")
    browser.close()
