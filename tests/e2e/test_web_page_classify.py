"""The comparison page's classify mode in real headless Chromium against the live server: the head picker offers
what can classify, the bars show the server's own probabilities in label order, label words reach the server,
and a refused request shows the server's reason."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch

from heads import ClassifierConfig, ClassifierHead, LinearHead, save_head
from heads.base import EMBEDDED_BASE, load_base
from tests.e2e.browser import CHROMIUM, DESKTOP, launch, open_page
from tests.e2e.serving import REPO_ROOT, Server, serve

if not CHROMIUM.exists():
    pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium package (.ci/run does)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency: make setup")

LABELS = ["negative", "neutral", "positive"]
TEMPLATE = "Review: {problem}\nSentiment:"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("classify-page")
    shutil.copytree(REPO_ROOT / "registry" / "math", root / "heads" / "math")  # generative, no labels
    base = load_base(str(EMBEDDED_BASE))
    torch.manual_seed(0)
    classifier = ClassifierHead(ClassifierConfig(labels=LABELS, pooling="mean"), vocab_size=base.vocab_size,
                                n_embd=base.n_embd)
    save_head(classifier, root / "heads" / "sentiment", base.info(), task="sentiment", prompt_template=TEMPLATE)
    verbal = LinearHead(vocab_size=base.vocab_size, n_embd=base.n_embd).init_from(base.embeddings)
    save_head(verbal, root / "heads" / "verbal", base.info(), task="sentiment", prompt_template=TEMPLATE,
              labels=["the", "apples"], label_token_ids=[275, 378])
    with serve(EMBEDDED_BASE, root / "heads", root / "server.log") as running:
        yield running


@pytest.fixture(scope="module")
def page(server: Server) -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        browser = launch(p)
        try:
            page = open_page(browser, server.url, **DESKTOP)
            page.check('input[name="mode"][value="classify"]')
            page.wait_for_selector("#classify:enabled")
            yield page
        finally:
            browser.close()


def classify(page: Any) -> dict[str, Any]:
    """Click Classify; the body the page sent, once the summary says how it went."""
    with page.expect_request("**/classify") as request:
        page.click("#classify")
    page.wait_for_function("() => /^(classified|error|request failed)/.test("
                           "document.querySelector('#summary').textContent)")
    return request.value.post_data_json  # type: ignore[no-any-return]


def rows(page: Any) -> list[str]:
    return page.locator("#label-bars tbody tr").all_inner_texts()  # type: ignore[no-any-return]


def test_a_classifier_heads_probabilities_show_as_bars_in_label_order(page: Any, server: Server) -> None:
    assert page.locator("#form").is_hidden() and page.locator(".columns").is_hidden()
    options = page.locator("#classify-head option").all_inner_texts()
    assert options == ["base (label words)", f"sentiment (classifier: {', '.join(LABELS)})",
                       "verbal (verbalizer: the, apples)", "math (label words)"]
    assert page.locator("#classify-head").input_value() == "sentiment"
    assert page.locator("#label-words-field").is_hidden()  # a classifier brings its own labels
    page.fill("#classify-text", "The plot is a mess and the jokes fall flat.")
    sent = classify(page)
    assert sent == {"text": "The plot is a mess and the jokes fall flat.", "head": "sentiment"}
    answer = httpx.post(f"{server.url}/classify", json=sent, timeout=30).json()["results"][0]
    shown = [row.split("\t") for row in rows(page)]
    assert [(label.strip(), p.strip()) for label, _, p in shown] == [
        (f'"{item["label"]}"', f'{item["probability"]:.3f}') for item in answer["probabilities"]]
    assert page.locator("#label-bars tr.top").inner_text().split("\t")[0].strip() == f'"{answer["label"]}"'
    widths = page.locator("#label-bars .bar").evaluate_all("bars => bars.map(b => b.style.getPropertyValue('--w'))")
    assert widths == [f"{item['probability'] * 100:.1f}%" for item in answer["probabilities"]]
    assert page.locator("#summary").inner_text().startswith(f'classified: "{answer["label"]}"')
    assert page.locator("#classify-prompt").inner_text() == answer["prompt"] == TEMPLATE.replace(
        "{problem}", sent["text"])


def test_label_words_reach_the_server_and_a_refusal_shows_its_reason(page: Any, server: Server) -> None:
    page.select_option("#classify-head", "")
    assert page.locator("#label-words-field").is_visible()
    page.fill("#classify-text", "How many")
    page.fill("#label-words", " The\n apples\n bags")
    with page.expect_request("**/classify") as request:  # Ctrl+Enter submits the mode's own form
        page.press("#classify-text", "Control+Enter")
    page.wait_for_function("() => document.querySelector('#summary').textContent.startsWith('classified')")
    sent = request.value.post_data_json
    assert sent == {"text": "How many", "label_words": [" The", " apples", " bags"]}
    answer = httpx.post(f"{server.url}/classify", json=sent, timeout=30).json()["results"][0]
    assert [row.split("\t")[2].strip() for row in rows(page)] == [f"{p['probability']:.3f}"
                                                                  for p in answer["probabilities"]]
    page.fill("#label-words", " The")
    assert classify(page)["label_words"] == [" The"]
    summary = page.locator("#summary")
    assert summary.inner_text().startswith("error 422: body.label_words") and "error" in summary.get_attribute(
        "class")
    page.select_option("#classify-head", "verbal")  # a verbalizer may leave its label words out
    page.fill("#label-words", "")
    assert classify(page) == {"text": "How many", "head": "verbal"}
    assert [row.split("\t")[0].strip() for row in rows(page)] == ['"the"', '"apples"']
    page.check('input[name="mode"][value="generate"]')
    assert page.locator("#form").is_visible() and page.locator("#classify-form").is_hidden()


def test_a_long_text_is_refused_unless_truncate_is_checked(page: Any) -> None:
    page.check('input[name="mode"][value="classify"]')
    page.select_option("#classify-head", "sentiment")
    page.fill("#classify-text", "so long " * 400 + "and fine.")
    page.uncheck("#classify-truncate")
    assert "truncate" not in classify(page)
    assert page.locator("#summary").inner_text().startswith("error 422") and "truncate: true" in page.locator(
        "#summary").inner_text()
    page.check("#classify-truncate")
    assert classify(page)["truncate"] is True
    assert page.locator("#summary").inner_text().startswith("classified")
    shown = page.locator("#classify-prompt").inner_text()
    assert shown.startswith("[start cut to fit the prompt limit]") and shown.endswith("and fine.\nSentiment:")
    page.uncheck("#classify-truncate")
