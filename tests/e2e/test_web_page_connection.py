"""The comparison page when its server goes away and comes back: it says "disconnected" instead of the device it
last saw, refuses to generate meanwhile, and recovers on its own (a server of its own, stopped and restarted)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench.server_proc import ServerProcess
from tests.e2e.browser import CHROMIUM, DESKTOP, column, launch, open_page, wait_finished
from tests.e2e.serving import READY_TIMEOUT_S, REPO_ROOT

if not CHROMIUM.exists():
    pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium package (.ci/run does)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency: make setup")


def test_the_page_shows_a_dead_server_and_recovers_when_it_is_back(tmp_path: Path) -> None:
    shutil.copytree(REPO_ROOT / "registry", tmp_path / "heads")
    base = REPO_ROOT / "models" / "mini-gpt2"
    env = {"OMP_NUM_THREADS": "1"}
    first = ServerProcess(base, tmp_path / "heads", tmp_path / "first.log", env=env, ready_timeout_s=READY_TIMEOUT_S)
    with sync_api.sync_playwright() as p:
        browser = launch(p)
        try:
            with first:
                page = open_page(browser, first.url, **DESKTOP)
                assert page.locator("#connection").get_attribute("data-state") == "ready"
                assert page.locator("#base-info").inner_text() == "base models/mini-gpt2 on cpu"
            # The server is gone: the page must notice on its own, without a click.
            page.wait_for_selector('#connection[data-state="disconnected"]', timeout=15_000)
            header = page.locator("header").inner_text()
            assert "disconnected" in header and "on cpu" not in header
            assert page.locator("#generate").is_disabled()
            page.press("#prompt", "Control+Enter")  # nothing to send it to: the page does not try
            assert page.locator("#summary").inner_text() == ""
            second = ServerProcess(base, tmp_path / "heads", tmp_path / "second.log", env=env,
                                   ready_timeout_s=READY_TIMEOUT_S)
            second.port, second.url = first.port, first.url  # back at the address the page knows
            with second:
                page.wait_for_selector('#connection[data-state="ready"]', timeout=15_000)
                assert page.locator("#base-info").inner_text() == "base models/mini-gpt2 on cpu"
                assert page.locator("#generate").is_enabled() and page.locator("#head").input_value() == "math"
                page.fill("#max-tokens", "8")
                page.click("#generate")
                assert wait_finished(page).startswith("done: 8 tokens")
                assert column(page, "main")
        finally:
            browser.close()
