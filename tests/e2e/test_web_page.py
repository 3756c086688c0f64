"""The comparison page in real headless Chromium (Debian's), driven by Playwright, against the live server:
every control at desktop size, then the page on a phone with touch.

Set HEADSERVE_SCREENSHOT=docs/web-page.png to refresh the screenshots the README shows (tests/e2e/browser.py).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.browser import (
    CHROMIUM,
    DESKTOP,
    PHONE,
    answer,
    column,
    generate,
    keep_screenshot,
    launch,
    metric,
    open_page,
    texts,
    tokens,
    wait_finished,
)
from tests.e2e.serving import REPO_ROOT, Server, serve

if not CHROMIUM.exists():
    pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium package (.ci/run does)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency: make setup")

# The page's default: a held-out problem of the kind the committed `math` head was trained on (training.synth's
# three-step template), which the head answers right and the base's own head does not.
DEFAULT_PROMPT = ("Hana gets 4 bags with 32 apples each, uses 33 of them, then gets 10 more. "
                  "How many apples does Hana have?")
MAX_NEW_TOKENS = 200  # the server's limit here, so the page must read it rather than assume the default 256


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("web")
    shutil.copytree(REPO_ROOT / "registry", root / "heads")
    shutil.copytree(REPO_ROOT / "registry" / "math-linear", root / "heads" / "gone")  # deleted behind the page's back
    (root / "heads" / "broken").mkdir()  # listed invalid by the server: never offered in the picker
    (root / "heads" / "broken" / "head_config.json").write_text('{"head_type": "linear", "config": null}')
    with serve(REPO_ROOT / "models" / "mini-gpt2", root / "heads", root / "server.log",
               env={"HEADSERVE_MAX_NEW_TOKENS": str(MAX_NEW_TOKENS)}) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        chromium = launch(p)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def page(browser: Any, server: Server) -> Any:
    return open_page(browser, server.url, **DESKTOP)


def test_defaults_stream_three_columns_with_the_prompt_sent_and_one_live_summary(page: Any, server: Server,
                                                                                  tmp_path: Path) -> None:
    assert page.locator("#head").input_value() == "math"
    assert page.locator('#head option[value="broken"]').count() == 0
    assert page.locator("#connection").get_attribute("data-state") == "ready"
    assert page.locator("#base-info").inner_text() == "base models/mini-gpt2 on cpu"
    assert page.locator("#prompt").input_value() == page.locator("#prompt").get_attribute("placeholder") \
        == DEFAULT_PROMPT
    # Only the summary speaks to screen readers: no column announces every token.
    live = "[...document.querySelectorAll('[aria-live], [role=status], [role=log], [role=alert]')].map(e => e.id)"
    assert page.evaluate(f"() => {live}") == ["summary"]
    # A slow link (16 KiB/s) makes the stream arrive in pieces however fast the server decodes.
    page.evaluate("""() => {
        window.tokenTimes = [];
        new MutationObserver(() => window.tokenTimes.push(performance.now()))
            .observe(document.querySelector('.columns'), {childList: true, subtree: true});
    }""")
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": 16 * 1024,
                                                  "uploadThroughput": -1})
    try:
        sent = generate(page)
        summary = wait_finished(page)
    finally:
        cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1,
                                                      "uploadThroughput": -1})
    assert sent["prompt"] == DEFAULT_PROMPT and sent["head"] == "math" and sent["stop"] == ["\n"]
    assert sent["decoding"]["strategy"] == "greedy" and sent["top_logprobs"] == 5
    expected = answer(server.url, sent)
    assert expected["text"].endswith("The answer is 105.")  # the head gets the default problem right ...
    assert "105" not in texts(expected)["linear_greedy"]  # ... and the base's own head does not (README says so)
    arrivals = page.evaluate("() => [...new Set(window.tokenTimes.map(t => Math.round(t)))]")
    assert len(arrivals) >= 3 and arrivals[-1] - arrivals[0] > 100, arrivals  # in pieces, not all at the end
    for decoder, text in texts(expected).items():
        if decoder != "linear_top_k":  # sampled with a fresh seed (the seed field is empty): its own text
            assert column(page, decoder) == text, decoder  # the streamed spans spell the full answer
        stats = column(page, decoder, "stats")
        assert "first token" in stats and "tok/s" in stats, stats
    assert re.fullmatch(rf"done: {expected['tokens']} tokens in \d+\.\d\d s \(stop\)", summary), summary
    assert page.locator("#sent-prompt").inner_text() == expected["prompt"] == f"Problem: {DEFAULT_PROMPT}\nSolution:"
    assert "head: math" in page.locator('.column[data-decoder="main"] h2').inner_text()
    # Shading has a floor: even the least likely token stays visible.
    shades = tokens(page, "linear_top_k").evaluate_all(
        "spans => spans.map(s => parseFloat(getComputedStyle(s).getPropertyValue('--shade')))")
    assert shades and min(shades) >= 0.14
    generate(page)  # again at full speed, for the screenshot's timings
    assert wait_finished(page).startswith("done")
    # The screenshot shows the token panel for the least likely token the top-k sampler picked.
    top_k = tokens(page, "linear_top_k")
    shades = top_k.evaluate_all("spans => spans.map(s => parseFloat(s.style.getPropertyValue('--p')))")
    top_k.nth(shades.index(min(shades))).hover()
    assert page.locator("#token-info").is_visible()
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    keep_screenshot(tmp_path / "page.png")


def test_sampling_settings_reach_the_server(page: Any, server: Server) -> None:
    page.select_option("#strategy", "top_p")
    page.fill("#temperature", "0.7")
    page.fill("#top-p", "0.8")
    page.fill("#top-k", "20")
    page.fill("#seed", "11")
    page.fill("#stop", "\\n\nThe answer")
    sent = generate(page)
    assert wait_finished(page).startswith("done")
    assert sent["decoding"] == {"strategy": "top_p", "temperature": 0.7, "top_p": 0.8, "top_k": 20, "seed": 11}
    assert sent["stop"] == ["\n", "The answer"]
    expected = answer(server.url, sent)
    for decoder, text in texts(expected).items():
        assert column(page, decoder) == text, decoder  # same seed, same settings: the same text as without streaming
    assert "The answer" not in column(page, "main")
    assert "top-p 0.8 · T 0.7 · seed 11" in page.locator('.column[data-decoder="main"] h2').inner_text()
    assert "top-k 20 · T 0.7 · seed 11" in page.locator('.column[data-decoder="linear_top_k"] h2').inner_text()


def test_ctrl_enter_and_cmd_enter_generate(page: Any) -> None:
    page.fill("#prompt", "Dan has 87 buttons. Dan buys 5 more buttons. How many buttons does Dan have now?")
    for chord in ("Control+Enter", "Meta+Enter"):
        sent = generate(page, lambda chord=chord: page.press("#prompt", chord))
        assert sent["prompt"].startswith("Dan has 87")
        assert wait_finished(page).startswith("done")
        assert page.locator("#prompt").input_value().startswith("Dan has 87")  # no newline typed into the prompt


def test_keyboard_focus_on_a_token_shows_its_probability_and_alternatives(page: Any, server: Server) -> None:
    page.select_option("#strategy", "greedy")
    page.fill("#stop", "\\n")
    page.fill("#prompt", DEFAULT_PROMPT)
    sent = generate(page)
    assert wait_finished(page).startswith("done")
    expected = answer(server.url, sent)["logprobs"]
    info = page.locator("#token-info")
    assert info.is_hidden()
    page.focus("#generate")
    page.keyboard.press("Tab")  # Stop is disabled: the next stop is the chosen head's first token
    for index in (0, 1):
        focused = page.evaluate("() => document.activeElement.closest('.tokens') && "
                                "[...document.activeElement.parentElement.children].indexOf(document.activeElement)")
        assert focused == index
        assert info.is_visible()
        item = expected[index]
        text = info.inner_text()
        assert f"p = {math.exp(item['logprob']):.3f}" in text
        rows = info.locator("tbody tr").all_inner_texts()
        assert len(rows) == 5
        for row, alternative in zip(rows, item["top"], strict=True):
            assert row.startswith(json.dumps(alternative["token"], ensure_ascii=False))  # as JSON.stringify shows it
            assert f"{math.exp(alternative['logprob']):.3f}" in row
        assert page.evaluate("() => document.activeElement.getAttribute('aria-describedby')") == "token-info"
        page.keyboard.press("ArrowRight")
    page.keyboard.press("Escape")
    assert info.is_hidden()
    page.keyboard.press("Tab")  # one tab stop per column: on to the linear head's tokens
    assert page.evaluate("() => document.activeElement.closest('.column').dataset.decoder") == "linear_greedy"
    assert info.is_visible() and "linear head greedy" in info.inner_text()
    page.focus("#prompt")
    assert info.is_hidden()


def test_max_tokens_is_bounded_by_the_servers_limit(page: Any) -> None:
    field = page.locator("#max-tokens")
    assert field.get_attribute("max") == str(MAX_NEW_TOKENS)  # from /readyz, not the markup's 256
    field.fill("1000")
    field.press("Tab")
    assert field.input_value() == str(MAX_NEW_TOKENS)
    assert str(MAX_NEW_TOKENS) in page.locator("#form-note").inner_text()
    field.fill("5000")
    sent = generate(page, lambda: page.press("#max-tokens", "Control+Enter"))  # no change event: clamped on submit
    assert sent["max_new_tokens"] == MAX_NEW_TOKENS
    assert wait_finished(page).startswith("done")


def test_stop_cancels_the_stream_and_the_server_frees_the_request(page: Any, server: Server) -> None:
    # The base at temperature 8 with this seed never meets its end token: the answer would run to the limit.
    page.select_option("#head", "")
    page.check("#raw")
    page.fill("#prompt", "Ava has")
    page.select_option("#strategy", "top_p")
    page.fill("#top-p", "1")
    page.fill("#temperature", "8")
    page.fill("#seed", "1")
    page.fill("#stop", "")
    abandoned = metric(server.url, "headserve_abandoned_requests_total")
    sent = generate(page)
    page.wait_for_function("() => document.querySelectorAll('[data-decoder=main] .token').length > 0")
    # Freeze the server, so the request is surely still decoding when Stop is pressed.
    os.kill(server.pid, signal.SIGSTOP)
    try:
        page.click("#stop-button")
        assert wait_finished(page).startswith("stopped")
        received = tokens(page, "main").count()
    finally:
        os.kill(server.pid, signal.SIGCONT)
    deadline = time.monotonic() + 20
    while metric(server.url, "headserve_abandoned_requests_total") < abandoned + 1:
        assert time.monotonic() < deadline, "the server never saw the stopped stream go away"
        time.sleep(0.1)
    assert metric(server.url, "headserve_active_sequences") == 0
    assert tokens(page, "main").count() == received  # nothing arrived after Stop
    full = answer(server.url, sent)
    assert full["finish_reason"] == "length" and full["tokens"] == MAX_NEW_TOKENS > received
    page.wait_for_selector("#generate:enabled")  # (a readiness poll may have timed out while the server was frozen)
    assert page.locator("#stop-button").is_disabled()


def test_a_rejected_request_shows_the_servers_reason(page: Any, server: Server) -> None:
    page.uncheck("#raw")
    page.select_option("#head", "gone")
    assert httpx.delete(f"{server.url}/heads/gone", timeout=10).status_code == 204
    generate(page)
    assert wait_finished(page).startswith("error 404")
    assert "gone" in page.locator("#summary").inner_text()
    assert page.locator("#summary").evaluate("e => e.classList.contains('error')")


def test_on_a_phone_a_tapped_token_shows_its_probability(browser: Any, server: Server, tmp_path: Path) -> None:
    page = open_page(browser, server.url, **PHONE)
    try:
        page.tap("#generate")
        assert wait_finished(page).startswith("done")
        assert page.evaluate("() => document.documentElement.scrollWidth") <= 390  # nothing wider than the phone
        boxes = [page.locator(f'.column[data-decoder="{d}"]').bounding_box()
                 for d in ("main", "linear_greedy", "linear_top_k")]
        assert len({round(b["x"]) for b in boxes}) == 1 and boxes[0]["y"] < boxes[1]["y"] < boxes[2]["y"]  # stacked
        info = page.locator("#token-info")
        token = tokens(page, "main").filter(has_text=re.compile(r"^1$")).last  # 105: the answer's first digit
        token.scroll_into_view_if_needed()
        token.tap()
        assert info.is_visible()
        assert re.search(r"p = \d\.\d{3}", info.inner_text()) and info.locator("tbody tr").count() == 5
        sheet = info.bounding_box()  # a bottom sheet on a phone, inside the screen
        assert sheet["x"] == 0 and sheet["width"] == 390 and round(sheet["y"] + sheet["height"]) == 844
        page.screenshot(path=str(tmp_path / "phone.png"))
        keep_screenshot(tmp_path / "phone.png", "-phone")
        page.tap("h1")  # a tap elsewhere puts it away
        assert info.is_hidden()
    finally:
        page.context.close()
