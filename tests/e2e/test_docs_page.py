"""/docs in real headless Chromium with every other host unreachable: Swagger UI still renders the API."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.e2e.browser import CHROMIUM, launch
from tests.e2e.serving import REPO_ROOT, Server, serve

if not CHROMIUM.exists():
    pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium package (.ci/run does)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency: make setup")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("docs")
    shutil.copytree(REPO_ROOT / "registry", root / "heads")
    with serve(REPO_ROOT / "models" / "mini-gpt2", root / "heads", root / "server.log") as running:
        yield running


def test_swagger_ui_renders_every_operation_offline(server: Server) -> None:
    own = urlsplit(server.url).netloc
    elsewhere: list[str] = []

    def only_this_server(route: Any) -> None:
        """Anything not on the server fails as it would offline, and is remembered."""
        url = route.request.url
        if urlsplit(url).netloc == own or url.startswith("data:"):
            route.continue_()
        else:
            elsewhere.append(url)
            route.abort()

    with sync_api.sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.route("**/*", only_this_server)
            page.goto(f"{server.url}/docs")
            page.wait_for_selector(".opblock", timeout=30_000)  # Swagger UI's block for one operation
            paths = page.locator(".opblock-summary-path").all_inner_texts()
            title = page.locator(".info .title").inner_text()
            # Open one operation: its request body schema is drawn from /openapi.json, by Swagger UI's own JS.
            page.locator(".opblock-post .opblock-summary-path", has_text="/generate").first.click()
            page.wait_for_selector(".opblock-post.is-open .opblock-body", timeout=10_000)
            body = page.locator(".opblock-post.is-open .opblock-body").inner_text()
        finally:
            browser.close()
    assert "headserve" in title
    assert {"/generate", "/heads", "/healthz", "/v1/completions"} <= {path.replace("\u200b", "") for path in paths}
    assert "prompt" in body and "max_new_tokens" in body
    assert elsewhere == [], f"the docs page tried to reach other hosts: {elsewhere}"
