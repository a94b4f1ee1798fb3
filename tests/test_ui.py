"""The Streamlit playground: unit tests with AppTest against a real API, and a real browser end to end."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from streamlit.testing.v1 import AppTest

from helpers import server
from slm.testing import free_port

APP = Path(__file__).resolve().parents[1] / "src" / "slm" / "ui" / "app.py"


@pytest.fixture(scope="module")
def api(trained):
    with server(trained) as url:
        yield url


@pytest.fixture()
def app_with(monkeypatch):
    def make(api_url: str) -> AppTest:
        monkeypatch.setenv("SLM_API_URL", api_url)  # read by the script on every rerun
        at = AppTest.from_file(str(APP), default_timeout=120)
        at.run()
        return at

    return make


def run_prompt(at: AppTest, prompt: str, models: list[str], temperature: float = 0.0) -> AppTest:
    at.text_area(key="prompt").input(prompt)
    at.multiselect(key="models").set_value(models)
    at.slider(key="temperature").set_value(temperature)
    at.slider(key="max_new_tokens").set_value(30)
    at.button(key="run").click()
    return at.run(timeout=120)


def test_defaults(api, app_with):
    at = app_with(api)
    assert not at.exception
    assert at.multiselect(key="models").value == ["basic", "cached"]
    assert at.text_area(key="prompt").value == "Once upon a time"


def test_basic_and_cached_answers_with_speedup(api, app_with):
    at = run_prompt(app_with(api), "Once upon a time there was", ["basic", "cached"])
    assert not at.exception and not at.error
    answers = [m.value for m in at.markdown if "slm-text" in m.value]
    assert len(answers) == 2 and answers[0] == answers[1]  # greedy: the same text with and without the cache
    # The prompt comes first, set apart; the text is HTML-escaped with line breaks kept, so no Markdown applies.
    assert answers[0].startswith('<div class="slm-text"><span style="color:#888">Once upon a time there was</span>')
    assert len(answers[0]) > len('<div class="slm-text"><span style="color:#888">Once upon a time there was</span>')
    captions = [c.value for c in at.caption if "tokens/s" in c.value]
    assert len(captions) == 2
    assert at.metric[0].label == "KV cache speedup" and at.metric[0].value.endswith("x")


def test_markdown_characters_stay_text(api, app_with):
    at = run_prompt(app_with(api), "# A *bold* <b>title</b>", ["basic"])
    assert not at.exception and not at.error
    answer = next(m.value for m in at.markdown if "slm-text" in m.value)
    assert "# A *bold* &lt;b&gt;title&lt;/b&gt;" in answer and "\n" not in answer


def test_untrained_alone_has_no_speedup(api, app_with):
    at = run_prompt(app_with(api), "Hello", ["untrained"], temperature=0.8)
    assert not at.exception and not at.error
    assert len(at.metric) == 0 and any("tokens/s" in c.value for c in at.caption)


def test_example_prompt_fills_the_prompt_box(app_with):
    at = app_with(f"http://127.0.0.1:{free_port()}")  # no request is made: only the prompt box changes
    examples = at.selectbox(key="example").options
    assert len(examples) >= 3 and examples[0] == at.text_area(key="prompt").value
    at.selectbox(key="example").set_value(examples[2]).run()
    assert not at.exception and at.text_area(key="prompt").value == examples[2]
    at.text_area(key="prompt").input("My own start").run()  # typing afterwards still wins
    assert at.text_area(key="prompt").value == "My own start"


def test_unreachable_api_shows_a_readable_error(app_with):
    at = run_prompt(app_with(f"http://127.0.0.1:{free_port()}"), "Once", ["basic", "cached"])
    assert not at.exception
    assert len(at.error) == 2 and all("Cannot reach the API" in e.value for e in at.error)


def test_api_error_is_shown(api, app_with):
    at = app_with(api)
    at.slider(key="max_new_tokens").set_value(30)
    at.text_area(key="prompt").input("x" * 25_000)  # over the API's prompt limit: a 422 to show, not a crash
    at.button(key="run").click()
    at.run(timeout=120)
    assert not at.exception
    assert at.error and all("API error 422" in e.value for e in at.error)


def test_words_need_a_model_trained_on_requests(api, app_with):
    at = app_with(api)
    at.text_input(key="words").input("fox, cake")
    at = run_prompt(at, "Once", ["basic", "cached"])
    assert not at.exception
    assert len(at.error) == 2 and all("API error 422" in e.value and "words" in e.value for e in at.error)


@pytest.mark.slow  # a server of its own (make test runs it)
def test_words_box_puts_the_request_in_front_of_the_prompt(story_model, app_with):
    with server(story_model) as url:
        at = app_with(url)
        at.text_input(key="words").input("fox, cake")
        at.checkbox(key="dialogue").check()
        at = run_prompt(at, "Once", ["basic", "cached"])
        assert not at.exception and not at.error
        answers = [m.value for m in at.markdown if "slm-text" in m.value]
        assert len(answers) == 2
        assert all("Words: fox, cake<br>Features: Dialogue<br>Story:<br>Once" in a for a in answers), answers
        at = run_prompt(at, "", ["basic", "cached"])  # the words alone are a prompt
        assert not at.exception and not at.error and not at.warning
        answers = [m.value for m in at.markdown if "slm-text" in m.value]
        assert len(answers) == 2 and all("Features: Dialogue<br>Story:<br></span>" in a for a in answers), answers


# ---- a real browser ---------------------------------------------------------------------------------------
def chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.fail("Debian's chromium is needed for the browser test: run `make test` (it installs it as root) "
                    "or `sudo apt-get install chromium`")
    return path


@pytest.mark.slow
def test_browser_end_to_end(tmp_path):
    """The real pair with the bundled model: type a prompt, run basic and cached, see both answers and the speedup.

    The screenshot goes to a temporary directory; `make screenshot` (SLM_SCREENSHOT=docs/playground.png)
    is the one way it lands in the repository."""
    shot = Path(os.environ.get("SLM_SCREENSHOT") or tmp_path / "playground.png")
    with server("default") as api:
        browse(api, shot)


def browse(api: str, shot: Path) -> None:
    from playwright.sync_api import sync_playwright

    port = free_port()
    env = {**os.environ, "SLM_API_URL": api}
    ui = subprocess.Popen([sys.executable, "-m", "slm.cli", "ui", "--port", str(port)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(120):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/_stcore/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.25)
        else:
            pytest.fail("the UI did not start")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium(), args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}", timeout=60_000)
            box = page.get_by_label("Prompt", exact=True)
            box.wait_for(timeout=60_000)
            box.fill("Once upon a time there was a little fox")
            box.press("Control+Enter")  # commit the text area's value
            page.get_by_role("button", name="Run", exact=True).click()
            page.get_by_text("KV cache speedup").wait_for(timeout=120_000)
            page.locator("canvas, svg.marks").first.wait_for(timeout=30_000)  # the chart of the two times
            page.wait_for_timeout(1000)
            body = page.inner_text("body")
            assert "Trained, no KV cache" in body and "Trained + KV cache" in body
            assert body.count("tokens/s") >= 2
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
        assert shot.stat().st_size > 10_000
    finally:
        ui.terminate()
        ui.wait(timeout=20)
