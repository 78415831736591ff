"""The web chat page in headless Chromium (Debian's /usr/bin/chromium through playwright), real server + model.

A screenshot of the answered chat is saved as tests/artifacts/web_chat.png (gitignored).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.gateway import run_gateway
from tests.serving import triton_server  # noqa: F401  (module-scoped server fixture)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).with_name("artifacts")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]

pytestmark = [pytest.mark.server, pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian chromium (make deps-browser)")]

# records every distinct text of the answer bubble while it streams, in window.seen
WATCH_ANSWER = """() => {
  window.seen = [];
  window.watch = setInterval(() => {
    const a = document.querySelector('.msg.assistant');
    if (a && window.seen[window.seen.length - 1] !== a.textContent) window.seen.push(a.textContent);
    if (a && a.dataset.state === 'done') clearInterval(window.watch);
  }, 5);
}"""


@pytest.fixture(scope="module")
def gateway(triton_server, tmp_path_factory):
    log = tmp_path_factory.mktemp("web") / "gateway.log"
    with run_gateway(triton_server.grpc_url, triton_server.tokenizer_dir, log) as url:
        yield url


@pytest.fixture(scope="module")
def page():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 900, "height": 640})
        yield page
        browser.close()


def test_page_streams_an_answer_and_starts_a_new_chat(gateway, page, triton_server):
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(gateway + "/")
    page.wait_for_function(f"document.getElementById('model').textContent.includes('{triton_server.model}')")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "12")
    page.fill("#input", "What is the capital of France?")
    page.evaluate(WATCH_ANSWER)                                  # watch before the question is sent
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant[data-state=done]", timeout=120_000)
    seen = page.evaluate("window.seen")
    answer = page.inner_text(".msg.assistant")
    assert answer.strip(), "empty answer"
    assert len([s for s in seen if s]) >= 3, f"the answer did not stream: {seen}"
    assert page.inner_text(".msg.user") == "What is the capital of France?"
    assert not page.query_selector(".msg.error") and not errors
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web_chat.png"), full_page=True)

    page.click("#new_chat")
    assert page.query_selector_all(".msg") == []
    page.fill("#max_tokens", "4")
    page.fill("#input", "Say hi")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant[data-state=done]", timeout=120_000)
    assert page.inner_text(".msg.assistant").strip()
    assert len(page.query_selector_all(".msg.user")) == 1        # the new chat holds only its own turn
