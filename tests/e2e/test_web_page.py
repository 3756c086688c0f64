"""The comparison page in real headless Chromium (Debian's), driven by Playwright, against the live server.

Set HEADSERVE_SCREENSHOT=docs/web-page.png to refresh the screenshot the README shows.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.serving import REPO_ROOT, Server, serve

CHROMIUM = Path("/usr/bin/chromium")
# Headless, and quiet: with background networking on, Chromium keeps dialling hosts this machine cannot reach.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
PROMPT = "What is 12 + 7?"

if not CHROMIUM.exists():
    pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium package (.ci/run does)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency: make setup")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("web")
    shutil.copytree(REPO_ROOT / "registry", root / "heads")
    (root / "heads" / "broken").mkdir()  # listed invalid by the server: never offered in the picker
    (root / "heads" / "broken" / "head_config.json").write_text('{"head_type": "linear", "config": null}')
    with serve(REPO_ROOT / "models" / "mini-gpt2", root / "heads", root / "server.log") as running:
        yield running


@pytest.fixture(scope="module")
def page(server: Server) -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            page.goto(f"{server.url}/")
            yield page
        finally:
            browser.close()


def column(page: Any, decoder: str, part: str) -> str:
    return page.locator(f'.column[data-decoder="{decoder}"] .{part}').inner_text()


def test_generate_fills_all_three_columns_as_the_server_decodes(page: Any, server: Server,
                                                                  tmp_path: Path) -> None:
    page.wait_for_selector('#head option[value="math"]', state="attached")
    assert page.locator("#head").input_value() == "math"
    assert page.locator('#head option[value="broken"]').count() == 0
    assert "base" in page.locator("#base-info").inner_text()
    page.fill("#prompt", "")
    page.locator("#prompt").press_sequentially(PROMPT)  # typed key by key, as a user would
    page.fill("#max-tokens", "40")
    page.fill("#seed", "3")
    # Record when token spans appear, to see that the columns fill while the answer is still coming.
    page.evaluate("""() => {
        window.tokenTimes = [];
        new MutationObserver(records => {
            if (records.some(r => [...r.addedNodes].some(n => n.classList && n.classList.contains('token')))) {
                window.tokenTimes.push(performance.now());
            }
        })
            .observe(document.querySelector('.columns'), {childList: true, subtree: true});
    }""")
    # A slow link (16 KiB/s) makes the stream arrive in pieces however fast the server decodes.
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": 16 * 1024,
                                                  "uploadThroughput": -1})
    page.click("#generate")
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('done')",
                           timeout=30_000)
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1,
                                                  "uploadThroughput": -1})
    expected = httpx.post(f"{server.url}/generate", timeout=30, json={
        "prompt": PROMPT, "head": "math", "max_new_tokens": 40, "compare": True,
        "decoding": {"strategy": "greedy", "top_k": 50, "seed": 3}}).json()
    arrivals = page.evaluate("() => [...new Set(window.tokenTimes.map(t => Math.round(t)))]")
    assert len(arrivals) >= 3 and arrivals[-1] - arrivals[0] > 100, arrivals  # in pieces, not all at the end
    texts = {"main": expected["text"], **{c["decoder"]: c["text"] for c in expected["comparisons"]}}
    for decoder, text in texts.items():
        assert column(page, decoder, "tokens") == text, decoder  # the streamed spans spell the full answer
        stats = column(page, decoder, "stats")
        assert "first token" in stats and "tok/s" in stats, stats
        spans = page.locator(f'.column[data-decoder="{decoder}"] .token')
        assert spans.count() >= 1
        shade = float(spans.first.evaluate("s => getComputedStyle(s).getPropertyValue('--p')"))
        assert 0 < shade <= 1
    assert "head: math" in page.locator('.column[data-decoder="main"] h2').inner_text()
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    if target := os.environ.get("HEADSERVE_SCREENSHOT"):
        shutil.copy(tmp_path / "page.png", REPO_ROOT / target)


def test_a_rejected_request_shows_the_servers_reason(page: Any) -> None:
    page.fill("#max-tokens", "1000")  # the form allows it; the server (MAX_NEW_TOKENS=256) does not
    page.click("#generate")
    page.wait_for_function("document.querySelector('#status').classList.contains('error')")
    assert "error 422" in page.locator("#status").inner_text()
    assert "max_new_tokens" in page.locator("#status").inner_text()
