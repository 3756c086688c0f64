"""The official `openai` client, unchanged, against the live server on the embedded base; stream disconnects."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.chat_base import make_chat_base
from tests.e2e.serving import REPO_ROOT, Server, serve

PROMPT = "Problem: What is 12 + 7?\nSolution:"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("openai")
    shutil.copytree(REPO_ROOT / "registry", root / "heads")  # the committed heads, served from a copy
    with serve(REPO_ROOT / "models" / "mini-gpt2", root / "heads", root / "server.log") as running:
        yield running


@pytest.fixture(scope="module")
def oai(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def test_models_list(oai: openai.OpenAI) -> None:
    models = {m.id: m for m in oai.models.list()}
    assert {"base", "math", "math-linear"} <= set(models)
    assert models["math"].owned_by == "headserve"


def test_completion_equals_the_servers_own_raw_generate(oai: openai.OpenAI, server: Server) -> None:
    out = oai.completions.create(model="math", prompt=PROMPT, max_tokens=24, temperature=0)
    with server.client() as client:
        same = client.generate(PROMPT, "math", max_new_tokens=24, raw=True)
    (choice,) = out.choices
    assert choice.text == same.text and choice.text.strip()
    assert out.usage is not None and out.usage.completion_tokens == same.tokens
    assert choice.finish_reason in {"stop", "length"}


def test_streaming_adds_up_to_the_completion(oai: openai.OpenAI) -> None:
    whole = oai.completions.create(model="math", prompt=PROMPT, max_tokens=24, temperature=0).choices[0]
    chunks = list(oai.completions.create(model="math", prompt=PROMPT, max_tokens=24, temperature=0, stream=True))
    assert len(chunks) >= 2
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason


def test_logprobs(oai: openai.OpenAI) -> None:
    out = oai.completions.create(model="base", prompt="12 + 7 =", max_tokens=4, temperature=0, logprobs=2)
    logprobs = out.choices[0].logprobs
    assert logprobs is not None and out.usage is not None
    assert len(logprobs.tokens or []) == len(logprobs.token_logprobs or []) == out.usage.completion_tokens
    assert all(len(top) <= 2 for top in logprobs.top_logprobs or [])
    assert all(lp <= 0 for lp in logprobs.token_logprobs or [])


def test_unknown_model_and_unsupported_n(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        oai.completions.create(model="no-such-head", prompt="x", max_tokens=2)
    assert "no-such-head" in str(missing.value)
    with pytest.raises(openai.UnprocessableEntityError) as bad:
        oai.completions.create(model="base", prompt="x", max_tokens=2, n=2)
    assert "n must be 1" in str(bad.value)


def test_chat_on_a_base_without_a_chat_template_says_so(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        oai.chat.completions.create(model="math", messages=[{"role": "user", "content": "What is 12 + 7?"}])
    assert "no chat template" in str(refused.value)


def test_chat_streams_through_the_official_client_on_a_chat_base(tmp_path: Path) -> None:
    base = make_chat_base(tmp_path / "base")
    shutil.copytree(REPO_ROOT / "registry", tmp_path / "heads")
    messages: Any = [{"role": "user", "content": "What is 12 + 7?"}]
    with serve(base, tmp_path / "heads", tmp_path / "server.log") as running, \
            openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        whole = client.chat.completions.create(model="base", messages=messages, max_tokens=24, temperature=0)
        chunks = list(client.chat.completions.create(model="base", messages=messages, max_tokens=24, temperature=0,
                                                     stream=True))
        with running.client() as ours:
            same = ours.generate("What is 12 + 7?", max_new_tokens=24)
    text = whole.choices[0].message.content
    assert text and text == same.text and same.prompt.startswith("<|user|>\n")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server: Server) -> None:
    body = {"prompt": "What is 12 + 7?", "head": "math", "max_new_tokens": 250, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        before = metric(http.get("/metrics").text, "headserve_abandoned_requests_total")
        with http.stream("POST", "/generate", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if line).startswith('data: {"type": "token"')
        # The connection is closed: the server drops the job at its next step, long before 250 tokens.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = http.get("/metrics").text
            if metric(text, "headserve_abandoned_requests_total") > before:
                break
            time.sleep(0.05)
        assert metric(text, "headserve_abandoned_requests_total") == before + 1
        assert metric(text, "headserve_active_sequences") == 0
