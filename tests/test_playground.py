"""The chat playground in a real browser: headless Chromium, driven by selenium, on the page of a
`pagoda serve` subprocess. The default model answers a question as it streams; the stop button
ends a long reply and the server's running-request gauge falls back to 0; a server with --api-key
has the page ask for the key; model output is shown as text, never run as HTML; the server's errors
are shown in the page. Screenshots go to $PAGODA_TEST_ARTIFACTS (default test-artifacts/)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serving import API_KEY, MAX_MODEL_LEN, MODEL, serving, tiny_model_args

webdriver = pytest.importorskip("selenium.webdriver", reason="the browser tests need selenium (pip install selenium)")
from selenium.webdriver.common.by import By  # noqa: E402 (after the skip when selenium is missing)

ARTIFACTS = Path(os.environ.get("PAGODA_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts"))
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,800"):
        options.add_argument(flag)
    chrome = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    chrome.set_script_timeout(30)
    yield chrome
    chrome.quit()


@pytest.fixture(scope="module")
def tiny_args(tmp_path_factory) -> list[str]:
    return tiny_model_args(tmp_path_factory.mktemp("playground"))


@pytest.fixture(scope="module")
def key_server(tiny_args, tmp_path_factory) -> Iterator[str]:
    """The base URL of a tiny model's server with --api-key."""
    with serving([*tiny_args, "--api-key", API_KEY], tmp_path_factory.mktemp("key-server") / "server.log") as (_, base):
        yield base


def wait_until(condition: Callable[[], Any], timeout: float = 60.0, what: str = "the page") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def open_page(browser: Any, base: str) -> None:
    browser.get(f"{base}/")
    wait_until(lambda: browser.execute_script("return document.readyState") == "complete")


def wait_for_models(browser: Any) -> list[str]:
    return wait_until(lambda: [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#model option")],
                      what="the model list")


def set_field(browser: Any, field_id: str, value: str) -> None:
    field = browser.find_element(By.ID, field_id)
    field.clear()
    field.send_keys(value)


def ask(browser: Any, question: str, max_tokens: int) -> Any:
    """Sends a question at temperature 0; the assistant's message element that will hold the reply."""
    if not browser.find_element(By.ID, "temperature").is_displayed():
        browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
    set_field(browser, "temperature", "0")
    set_field(browser, "max-tokens", str(max_tokens))
    set_field(browser, "prompt", question)
    browser.find_element(By.ID, "send").click()
    return browser.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1]


def finished(message: Any) -> str:
    """The reply's stats line once it has ended ('' before)."""
    stats = message.find_elements(By.CLASS_NAME, "stats")
    return stats[0].text if stats else ""


def running_requests(base: str) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics").text):
        if family.name == "pagoda:num_requests_running":
            return family.samples[0].value
    raise AssertionError("no pagoda:num_requests_running in /metrics")


def screenshot(browser: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    assert browser.save_screenshot(str(path))
    assert path.read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_default_model_streams_an_answer_and_stop_ends_a_long_reply(browser, loader_default_model_dir, tmp_path):
    env = {"PAGODA_CACHE_DIR": str(loader_default_model_dir.parents[1])}
    with serving(["--max-model-len", "2048", "--max-num-seqs", "4"], tmp_path / "server.log", env) as (_, base):
        open_page(browser, base)
        assert wait_for_models(browser) == ["SmolLM2-135M-Instruct"]
        # Each change of a reply's text is counted (a callback may carry several): a streamed reply
        # changes it once per chunk with text, a reply shown whole once.
        browser.execute_script("""
            window.replyChanges = 0;
            new MutationObserver(records => window.replyChanges += records.filter(
                r => r.target.parentElement?.classList.contains('assistant')).length).observe(
                document.getElementById('messages'), {childList: true, subtree: true});""")
        answer = ask(browser, QUESTION, max_tokens=40)
        stats = wait_until(lambda: finished(answer), what="the answer")
        assert "Paris" in answer.text
        assert "TTFT" in stats and "tokens/s" in stats and "failed" not in stats
        reply = browser.execute_script("return window.playground.lastReply")
        # Not one change a token: the last token may end the reply with no text, and a loaded
        # server may send two tokens in one chunk.
        assert reply["tokens"] > 3 and browser.execute_script("return window.replyChanges") > reply["tokens"] // 2
        screenshot(browser, "playground-answer.png")

        story = ask(browser, "Write a very long story about a dragon who learns to cook.", max_tokens=1500)
        wait_until(lambda: len(story.text) > 40, what="the story to start")
        assert running_requests(base) == 1
        browser.find_element(By.ID, "stop").click()
        assert "stopped" in wait_until(lambda: finished(story), timeout=10, what="the reply to stop")
        wait_until(lambda: running_requests(base) == 0, timeout=10, what="the running-request gauge to reach 0")
        stopped_text = story.text
        time.sleep(1)
        assert story.text == stopped_text  # nothing more arrives
        assert browser.find_element(By.ID, "send").is_enabled()
        assert not browser.find_element(By.ID, "stop").is_enabled()
        screenshot(browser, "playground-stopped.png")


def enter_key(browser: Any, key: str) -> None:
    wait_until(browser.find_element(By.ID, "key-form").is_displayed, what="the key prompt")
    set_field(browser, "api-key", key)
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()


def test_page_asks_for_the_api_key_and_refuses_a_wrong_one(browser, key_server):
    open_page(browser, key_server)
    enter_key(browser, "wrong-key")
    error = wait_until(lambda: browser.find_element(By.ID, "key-error").text, what="the key error")
    assert "API key" in error and browser.find_element(By.ID, "key-form").is_displayed()
    assert browser.execute_script("return window.playground.apiKey") is None  # a refused key is dropped
    assert not browser.find_elements(By.CSS_SELECTOR, "#model option")
    screenshot(browser, "playground-wrong-key.png")

    enter_key(browser, API_KEY)
    assert wait_for_models(browser) == [MODEL]
    assert not browser.find_element(By.ID, "key-form").is_displayed()
    reply = ask(browser, "hi", max_tokens=4)
    assert "4 tokens" in wait_until(lambda: finished(reply), what="the reply")
    # The key lives in the page's memory only: not in the URL, cookies or storage.
    assert API_KEY not in browser.current_url
    assert browser.execute_script("return document.cookie + localStorage.length + sessionStorage.length") == "00"


def test_server_errors_and_html_in_replies_are_shown_as_text(browser, key_server):
    open_page(browser, key_server)
    enter_key(browser, API_KEY)
    wait_for_models(browser)
    failed = ask(browser, "hi", max_tokens=MAX_MODEL_LEN * 4)  # past the context: a 400 naming the messages
    error = wait_until(lambda: failed.find_elements(By.CLASS_NAME, "error"), what="the error")[0].text
    assert error.startswith("Error 400 (messages): ") and "maximum context length" in error

    # A crafted reply, streamed through the page's own fetch: HTML and a script in model output.
    reply_text = ('<script>window.injected = 1</script><img src=x onerror="window.injected = 2">\n'
                  "**bold** and `<b>code</b>`\n```html\n<i>in a block</i>\n```")
    events = [{"choices": [{"index": 0, "delta": {"content": reply_text[i:i + 9]}}]}
              for i in range(0, len(reply_text), 9)]
    browser.execute_script("""
        const body = arguments[0].map(e => 'data: ' + JSON.stringify(e) + '\\n\\n').join('') + 'data: [DONE]\\n\\n';
        window.fetch = async () => new Response(body, {headers: {'Content-Type': 'text/event-stream'}});""",
                           events)
    crafted = ask(browser, "show me html", max_tokens=16)
    wait_until(lambda: finished(crafted), what="the crafted reply")
    assert browser.execute_script("return window.injected") is None
    assert not crafted.find_elements(By.CSS_SELECTOR, "script, img, b, i")
    assert "<script>window.injected = 1</script>" in crafted.text
    assert crafted.find_element(By.TAG_NAME, "strong").text == "bold"
    assert crafted.find_element(By.CSS_SELECTOR, "p code").text == "<b>code</b>"
    assert crafted.find_element(By.CSS_SELECTOR, "pre code").text == "<i>in a block</i>"
    screenshot(browser, "playground-html-as-text.png")


def test_page_is_served_unless_disabled(key_server, tiny_args, tmp_path):
    page = httpx.get(f"{key_server}/")  # the page itself needs no key: its API calls do
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert httpx.get(f"{key_server}/playground").content == page.content
    for asset, kind in (("playground.js", "text/javascript"), ("playground.css", "text/css")):
        assert httpx.get(f"{key_server}/playground/{asset}").headers["content-type"].startswith(kind)
    with serving([*tiny_args, "--disable-playground"], tmp_path / "server.log") as (_, base):
        assert httpx.get(f"{base}/").status_code == 404
        assert httpx.get(f"{base}/playground").status_code == 404
        assert httpx.get(f"{base}/v1/models").json()["data"][0]["id"] == MODEL
