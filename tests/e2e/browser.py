"""Headless Chromium (Debian's, through Playwright) pointed at the comparison page, for the browser tests.

Set HEADSERVE_SCREENSHOT=docs/web-page.png to refresh the screenshots the README shows: the desktop one
at that path and the phone one beside it (`web-page-phone.png`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.serving import REPO_ROOT

CHROMIUM = Path("/usr/bin/chromium")
# Headless, and quiet: with background networking on, Chromium keeps dialling hosts this machine cannot reach.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
DESKTOP = {"viewport": {"width": 1280, "height": 720}}
PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2, "is_mobile": True, "has_touch": True}
TIMEOUT_MS = 30_000


def launch(playwright: Any) -> Any:
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


def open_page(browser: Any, url: str, **context: Any) -> Any:
    """The page once /readyz answered it (Generate is enabled only then)."""
    page = browser.new_context(**context).new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(f"{url}/")
    page.wait_for_selector("#generate:enabled")
    return page


def column(page: Any, decoder: str, part: str = "tokens") -> str:
    return page.locator(f'.column[data-decoder="{decoder}"] .{part}').inner_text()  # type: ignore[no-any-return]


def tokens(page: Any, decoder: str) -> Any:
    return page.locator(f'.column[data-decoder="{decoder}"] .tokens .token')


def wait_finished(page: Any) -> str:
    """The summary once the generation ended (done, stopped or an error)."""
    page.wait_for_function("() => /^(done|stopped|error|request failed)/.test("
                           "document.querySelector('#summary').textContent)")
    return page.locator("#summary").inner_text()  # type: ignore[no-any-return]


def generate(page: Any, trigger: Any = None) -> dict[str, Any]:
    """Start a generation (a click on Generate unless `trigger` does it) and return the body the page sent."""
    with page.expect_request("**/generate") as request:
        (trigger or (lambda: page.click("#generate")))()
    return request.value.post_data_json  # type: ignore[no-any-return]


def answer(url: str, body: dict[str, Any]) -> dict[str, Any]:
    """The server's non-streamed answer to the body the page streamed (with each token's alternatives)."""
    plain = {**body, "stream": False, "return_logprobs": True}
    response = httpx.post(f"{url}/generate", json=plain, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def texts(expected: dict[str, Any]) -> dict[str, str]:
    return {"main": expected["text"], **{c["decoder"]: c["text"] for c in expected["comparisons"]}}


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name == name)


def keep_screenshot(made: Path, suffix: str = "") -> None:
    """Copy a screenshot the test made to where HEADSERVE_SCREENSHOT says (the phone one gets `-phone`)."""
    if target := os.environ.get("HEADSERVE_SCREENSHOT"):
        path = REPO_ROOT / target
        shutil.copy(made, path.with_name(f"{path.stem}{suffix}{path.suffix}"))
