"""/docs and /redoc load every script and stylesheet from this server: they work with no network at all."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings

ASSET = re.compile(r"""<(?:script|link)\b[^>]*?\b(?:src|href)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The app without its lifespan: the docs need no model, so none is loaded."""
    settings = Settings(heads_dir=tmp_path_factory.mktemp("heads"), device="cpu")
    yield TestClient(create_app(settings))


def _assets(html: str) -> list[str]:
    return ASSET.findall(html)


@pytest.mark.parametrize(("page", "kinds"), [("/docs", {".js", ".css"}), ("/redoc", {".js"})])
def test_docs_pages_use_only_assets_this_server_serves(client: TestClient, page: str, kinds: set[str]) -> None:
    response = client.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    assert "cdn." not in html and "fonts.googleapis" not in html
    urls = _assets(html)
    assert {Path(url).suffix for url in urls} >= kinds, urls
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), f"{page} loads {url} from elsewhere"
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 1000, url  # the real bundle, not an empty placeholder
    # The page reads the schema from this server too.
    assert "'/openapi.json'" in html or '"/openapi.json"' in html
    assert client.get("/openapi.json").json()["paths"]["/generate"]
