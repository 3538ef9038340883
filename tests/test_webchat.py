"""The web chat page (moekit/server/static/index.html) in a real browser: headless Debian chromium driven by
selenium against a running ``moekit serve`` (the embedded default model).

The page's own ``fetch`` is wrapped after load to record each request body (the history the page sends) and,
where a step needs it, to add fields the page has no control for (``seed``, ``ignore_eos`` for a reply long enough
to stop). Screenshots go to tests/artifacts/webchat.png; with MOEKIT_UPDATE_SCREENSHOTS=1 (or when it is missing)
also to docs/img/webchat.png, the README's picture, so an ordinary run leaves the work tree clean.
"""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is missing; install: pip install selenium")
if not (shutil.which("chromium") and shutil.which("chromedriver")):
    pytest.skip("chromium or chromedriver is missing; install: apt-get install chromium chromium-driver",
                allow_module_level=True)

from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from tests.servefixtures import http_get, serve_process

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
README_IMAGE = ROOT / "docs" / "img" / "webchat.png"
KEY = "s3cret-key"

# Wraps the page's fetch: records every JSON request body in window.__requests and merges window.__extra into it.
RECORD_FETCH = """
window.__requests = []; window.__extra = {};
const pageFetch = window.fetch;
window.fetch = (url, init) => {
  if (init && init.body) {
    const body = Object.assign(JSON.parse(init.body), window.__extra);
    window.__requests.push(body);
    init = Object.assign({}, init, {body: JSON.stringify(body)});
  }
  return pageFetch(url, init);
};
"""


# ---- the server and the browser -------------------------------------------------------------------------------------
def _serve(tmp_path_factory, *extra):
    """``moekit serve`` on a free loopback port; yield its base URL; SIGTERM it and check it exits 0."""
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    with serve_process(log_path, *extra) as (proc, url):
        yield url + "/"
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    assert rc == 0, f"moekit serve exited with {rc} on SIGTERM:\n{log_path.read_text()}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from _serve(tmp_path_factory)


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    yield from _serve(tmp_path_factory, "--api-key", KEY)


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--lang=en-US",
                "--window-size=1180,900", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=shutil.which("chromedriver")))
    driver.set_script_timeout(10)
    try:
        yield driver
    finally:
        driver.quit()


def running(base: str) -> float:
    """The server's count of requests in flight (its Prometheus gauge)."""
    text = http_get(base + "metrics")[1].decode()
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("moekit:num_requests_running"))


# ---- page helpers -----------------------------------------------------------------------------------------------
def wait_for(check, what: str, timeout: float = 20.0, every: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def open_page(driver, base: str):
    driver.execute_script("try { sessionStorage.clear(); } catch (e) {}")
    driver.get(base)
    driver.execute_script(RECORD_FETCH)


def messages(driver) -> list[tuple[str, str]]:
    """(class, text) of every rendered message, in order."""
    return [tuple(m) for m in driver.execute_script(
        "return [...document.querySelectorAll('#messages .msg')].map(e => [e.className, e.textContent])")]


def last_reply(driver) -> str:
    return driver.execute_script(
        "const m = document.querySelectorAll('#messages .msg.assistant'); return m.length ? m[m.length-1].textContent : null")


def busy(driver) -> bool:
    return driver.find_element(By.ID, "send").get_attribute("disabled") is not None


def set_value(driver, element_id: str, value):
    el = driver.find_element(By.ID, element_id)
    el.clear()
    el.send_keys(str(value))


def requests(driver) -> list[dict]:
    return driver.execute_script("return window.__requests")


def send(driver, text: str):
    """Type ``text`` into the prompt (newlines as Shift+Enter) and press Enter."""
    box = driver.find_element(By.ID, "prompt")
    lines = text.split("\n")
    for i, line in enumerate(lines):
        box.send_keys(line)
        if i < len(lines) - 1:
            box.send_keys(Keys.SHIFT, Keys.ENTER)  # a new line, not a send
    box.send_keys(Keys.ENTER)


def finish(driver, timeout: float = 30.0) -> list[int]:
    """Wait for the reply in flight to end; return the reply lengths polled while it streamed."""
    seen = []
    wait_for(lambda: busy(driver), "the request to start", timeout=5, every=0.005)
    while busy(driver):
        seen.append(len(last_reply(driver) or ""))
        assert len(seen) < timeout / 0.005, "the reply did not finish"
    return seen


def screenshot(driver, name: str, readme: bool = False):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / name))
    if readme and (os.environ.get("MOEKIT_UPDATE_SCREENSHOTS") == "1" or not README_IMAGE.exists()):
        README_IMAGE.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(README_IMAGE))


# ---- tests --------------------------------------------------------------------------------------------------------
def test_conversation_streams_stops_and_clears(server, browser):
    d = browser
    model = json.loads(http_get(server + "v1/models")[1])["data"][0]["id"]
    open_page(d, server)
    wait_for(lambda: d.find_element(By.ID, "model-name").text == model, f"the model name {model!r}")
    assert messages(d) == [] and d.find_element(By.ID, "empty").is_displayed()

    # Turn 1: the reply grows across polls before it finishes.
    d.execute_script("window.__extra = {seed: 1}")  # the README's picture stays the same from run to run
    set_value(d, "system", "You are moekit's demo model.")
    set_value(d, "max-tokens", 96)
    send(d, "A verse, please.")
    seen = finish(d)
    partial = sorted({n for n in seen if n > 0})
    reply1 = last_reply(d)
    assert len(partial) >= 2 and partial[0] < len(reply1), f"no streaming seen: polled lengths {seen}, final {reply1!r}"
    assert messages(d) == [("msg user", "A verse, please."), ("msg assistant", reply1)]

    # Turn 2: the request carries the whole history.
    send(d, "写一首诗")
    finish(d)
    reply2 = last_reply(d)
    assert messages(d) == [("msg user", "A verse, please."), ("msg assistant", reply1),
                           ("msg user", "写一首诗"), ("msg assistant", reply2)]
    sent = requests(d)
    assert len(sent) == 2
    assert sent[1]["model"] == model and sent[1]["stream"] is True and sent[1]["max_tokens"] == 96
    assert (sent[1]["temperature"], sent[1]["top_p"]) == (0.7, 0.9)
    assert sent[1]["messages"] == [
        {"role": "system", "content": "You are moekit's demo model."},
        {"role": "user", "content": "A verse, please."},
        {"role": "assistant", "content": reply1},
        {"role": "user", "content": "写一首诗"}]
    assert reply2 and d.find_element(By.ID, "error").is_displayed() is False
    screenshot(d, "webchat.png", readme=True)

    # A long reply, stopped mid-stream: Send works again and the partial reply stays, also in the history.
    set_value(d, "max-tokens", 700)  # with the prompt, within the model's 1024 tokens
    d.execute_script("window.__extra = {ignore_eos: true}")
    send(d, "Tell me a long story.")
    assert len(messages(d)) == 6
    wait_for(lambda: len(last_reply(d)) > 30, "the long reply to stream", every=0.005)
    d.find_element(By.ID, "stop").click()
    wait_for(lambda: not busy(d), "Send to be usable after Stop", timeout=5)
    assert d.find_element(By.ID, "stop").get_attribute("disabled") is not None
    stopped = last_reply(d)
    time.sleep(0.5)
    assert last_reply(d) == stopped and len(stopped) > 30
    assert d.execute_script("return document.querySelector('#messages .msg.assistant:last-child').dataset.note"
                            ) == "stopped"
    wait_for(lambda: running(server) == 0, "the server to abort the stopped request", timeout=3)
    screenshot(d, "webchat-stopped.png")
    d.execute_script("window.__extra = {}")
    set_value(d, "max-tokens", 4)
    send(d, "Thanks.\nThat will do.")  # Shift+Enter: a newline, not a send
    finish(d)
    assert requests(d)[-1]["messages"][-2:] == [{"role": "assistant", "content": stopped},
                                                {"role": "user", "content": "Thanks.\nThat will do."}]
    assert len(messages(d)) == 8

    # New chat clears the page and the history.
    d.find_element(By.ID, "new-chat").click()
    assert messages(d) == [] and d.find_element(By.ID, "empty").is_displayed()
    send(d, "hello")
    finish(d)
    assert [m["role"] for m in requests(d)[-1]["messages"]] == ["system", "user"]

    # The server's error JSON is shown, the turn is undone and its text given back.
    d.find_element(By.ID, "new-chat").click()
    set_value(d, "max-tokens", 1024)  # the prompt leaves less room than that
    send(d, "too long")
    error = wait_for(lambda: d.find_element(By.ID, "error").text, "the error message")
    assert "max_tokens" in error and "Error 400" in error
    assert messages(d) == [] and d.find_element(By.ID, "prompt").get_attribute("value") == "too long"
    assert not busy(d)


def test_html_is_shown_as_text(server, browser):
    d = browser
    open_page(d, server)
    set_value(d, "max-tokens", 8)
    html = '<img src=x onerror="window.__pwned = 1"><b>bold</b>'
    set_value(d, "system", "<script>window.__pwned = 2</script>")
    send(d, html)
    finish(d)
    assert messages(d)[0] == ("msg user", html)
    assert requests(d)[0]["messages"] == [{"role": "system", "content": "<script>window.__pwned = 2</script>"},
                                          {"role": "user", "content": html}]

    # Model output: a stream (served by a stand-in fetch, in pieces that split lines, events and a UTF-8
    # character) whose text is HTML.
    d.execute_script(r"""
      const parts = ['data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n: ping\n\nda',
                     'ta: {"choices":[{"delta":{"content":"<img src=x onerror=\\"window.__pwned = 3\\">"}}]}\r',
                     '\n\r\ndata: {"choices":[{"delta":{"content":"<b>诗', '"}}]}\n\ndata: {"choices":[{"delta":',
                     '{"content":"</b>"},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'];
      const bytes = parts.map(p => new TextEncoder().encode(p));
      const i = bytes[2].length - 10;  // cut inside the three bytes of 诗
      bytes.splice(2, 1, bytes[2].slice(0, i - 1), bytes[2].slice(i - 1));
      window.fetch = async () => new Response(new ReadableStream({
        async pull(c) { if (bytes.length) { await new Promise(r => setTimeout(r, 20)); c.enqueue(bytes.shift()); }
                        else c.close(); }}), {headers: {"Content-Type": "text/event-stream"}});
    """)
    send(d, "html please")
    finish(d)
    assert last_reply(d) == '<img src=x onerror="window.__pwned = 3"><b>诗</b>'
    assert d.execute_script("return document.querySelectorAll('#messages img, #messages b, #messages script').length"
                            ) == 0
    assert d.execute_script("return window.__pwned === undefined")


def test_api_key(keyed_server, browser):
    d = browser
    open_page(d, keyed_server)
    key_field = d.find_element(By.ID, "api-key")
    wait_for(key_field.is_displayed, "the API key field")
    assert d.find_element(By.ID, "model-name").text == "API key needed"
    assert "API key" in d.find_element(By.ID, "error").text
    set_value(d, "max-tokens", 4)
    key_field.send_keys("wrong", Keys.TAB)
    send(d, "hi")
    wait_for(lambda: "rejected" in d.find_element(By.ID, "error").text, "the rejected key's error")
    assert messages(d) == [] and d.find_element(By.ID, "prompt").get_attribute("value") == "hi"

    key_field.clear()
    key_field.send_keys(KEY, Keys.TAB)
    wait_for(lambda: d.find_element(By.ID, "model-name").text == "moekit-default", "the model name after the key")
    assert d.execute_script("return sessionStorage.getItem('moekit.apiKey')") == KEY
    assert not d.find_element(By.ID, "error").is_displayed()
    d.find_element(By.ID, "send").click()
    finish(d)
    assert [c for c, _ in messages(d)] == ["msg user", "msg assistant"] and last_reply(d)

    d.refresh()  # the key survives a reload of the tab
    wait_for(lambda: d.find_element(By.ID, "model-name").text == "moekit-default", "the model name after reload")
    assert d.find_element(By.ID, "api-key").get_attribute("value") == KEY


def test_narrow_screen(server, browser):
    d = browser
    d.set_window_size(390, 760)
    try:
        open_page(d, server)
        settings, toggle = d.find_element(By.ID, "settings"), d.find_element(By.ID, "settings-toggle")
        assert not settings.is_displayed() and toggle.get_attribute("aria-expanded") == "false"
        toggle.click()
        assert settings.is_displayed() and toggle.get_attribute("aria-expanded") == "true"
        set_value(d, "max-tokens", 4)
        toggle.click()
        assert not settings.is_displayed()
        send(d, "a narrow screen")
        finish(d)
        for el in ("prompt", "send", "stop", "new-chat"):
            assert d.find_element(By.ID, el).is_displayed(), el
        assert d.execute_script("""const r = document.getElementById('composer').getBoundingClientRect();
            return document.documentElement.scrollWidth <= innerWidth && r.right <= innerWidth && r.bottom <= innerHeight""")
        # every control has a label a screen reader can name
        assert d.execute_script("""return [...document.querySelectorAll('input, textarea')].filter(
            e => !(e.labels && e.labels.length)).map(e => e.id)""") == []
        screenshot(d, "webchat-narrow.png")
    finally:
        d.set_window_size(1180, 900)
