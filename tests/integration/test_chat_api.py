"""Chat: `/v1/chat/completions` through the official `openai` client, and chat-format heads on `/generate`.

The chat base is the embedded mini GPT-2 with a chat template added (tests/integration/chat_base.py): same
fingerprint, so the committed heads serve on it. The embedded base itself has no chat template: chat there
is a 400 that says so.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from heads import load_head, save_head
from heads.base import EMBEDDED_BASE, SHIPPED_HEADS, load_base
from heads.prompts import PromptStyle
from heads.sampling import SamplingParams
from server.app import create_app
from server.jobs import JobRequest, build_job
from server.settings import Settings
from tests.chat_base import make_chat_base
from tests.integration.ready import wait_ready
from training.data import Example, encode

PROBLEM = "Sam has 12 apples and buys 7 more. How many apples does Sam have?"
RENDERED = f"<|user|>\n{PROBLEM}<|endoftext|>\n<|assistant|>\n"
CHAT_HEAD = "chat-math"  # the committed `math` head's weights, recorded as trained on chat-formatted prompts


def _registry(root: Path) -> Path:
    """The committed heads plus `chat-math`."""
    heads_dir = root / "heads"
    shutil.copytree(SHIPPED_HEADS, heads_dir)
    head, meta = load_head(SHIPPED_HEADS / "math")
    save_head(head, heads_dir / CHAT_HEAD, {"base_model_name_or_path": meta.base_model_name_or_path,
                                            "base_fingerprint": meta.base_fingerprint},
              task="math", prompt_template="{problem}", prompt_format="chat")
    return heads_dir


def _serve(base_dir: Path, heads_dir: Path) -> Iterator[TestClient]:
    settings = Settings(base_model=str(base_dir), heads_dir=heads_dir, device="cpu", max_new_tokens=64)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        yield client


@pytest.fixture(scope="module")
def chat_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_chat_base(tmp_path_factory.mktemp("chat-base") / "base")


@pytest.fixture(scope="module")
def chat_client(chat_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    yield from _serve(chat_base_dir, _registry(tmp_path_factory.mktemp("chat")))


@pytest.fixture(scope="module")
def plain_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The embedded base as committed: no chat template."""
    yield from _serve(EMBEDDED_BASE, _registry(tmp_path_factory.mktemp("plain")))


@pytest.fixture(scope="module")
def oai(chat_client: TestClient) -> openai.OpenAI:
    """The official client, unchanged, talking to the in-process app (TestClient is an httpx.Client)."""
    return in_process(chat_client)


def in_process(client: TestClient) -> openai.OpenAI:
    """Not closed by the tests: closing it would close the TestClient it sends through."""
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)


def generate(client: TestClient, **body: Any) -> dict[str, Any]:
    r = client.post("/generate", json={"max_new_tokens": 24, **body})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def chat(client: TestClient, **body: Any) -> Any:
    length = {} if {"max_tokens", "max_completion_tokens"} & set(body) else {"max_tokens": 8}
    user = [{"role": "user", "content": PROBLEM}]
    return client.post("/v1/chat/completions", json={"model": "base", "messages": user, **length, **body})


def assert_openai_error(r: Any, status: int, *fragments: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for fragment in fragments:
        assert fragment in error["message"], error
    return error  # type: ignore[no-any-return]


@pytest.mark.parametrize("model", ["base", CHAT_HEAD])
def test_greedy_chat_equals_generate_with_chat_formatting(oai: openai.OpenAI, chat_client: TestClient,
                                                          chat_base_dir: Path, model: str) -> None:
    out = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": PROBLEM}], max_tokens=24,
                                      temperature=0)
    same = generate(chat_client, prompt=PROBLEM, head=None if model == "base" else model)
    assert same["prompt"] == RENDERED  # /generate formats the problem as the user message too
    (choice,) = out.choices
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-") and out.model == model
    assert choice.message.role == "assistant" and choice.message.content == same["text"] and same["text"].strip()
    assert choice.finish_reason == ("length" if same["finish_reason"] == "length" else "stop")
    tokenizer = load_base(str(chat_base_dir)).tokenizer
    prompt_tokens = len(tokenizer(RENDERED, add_special_tokens=False)["input_ids"])
    assert out.usage is not None and out.usage.prompt_tokens == prompt_tokens
    assert out.usage.completion_tokens == same["tokens"]


def test_streaming_chat_adds_up_to_the_completion(oai: openai.OpenAI) -> None:
    messages: Any = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": PROBLEM}]
    whole = oai.chat.completions.create(model=CHAT_HEAD, messages=messages, max_tokens=24, temperature=0)
    chunks = list(oai.chat.completions.create(model=CHAT_HEAD, messages=messages, max_tokens=24, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks) and len({c.id for c in chunks}) == 1
    *content, finish, usage = chunks
    assert content[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in content) == whole.choices[0].message.content
    assert all(c.choices[0].finish_reason is None for c in content)
    assert finish.choices[0].finish_reason == whole.choices[0].finish_reason and not finish.choices[0].delta.content
    assert usage.choices == [] and usage.usage == whole.usage


def test_the_comparison_decodes_see_the_heads_chat_prompt(chat_client: TestClient, oai: openai.OpenAI) -> None:
    out = generate(chat_client, prompt=PROBLEM, head=CHAT_HEAD, compare=["greedy"])
    base = oai.chat.completions.create(model="base", messages=[{"role": "user", "content": PROBLEM}], max_tokens=24,
                                       temperature=0)
    assert out["comparisons"][0]["text"] == base.choices[0].message.content


def test_raw_and_plain_heads_are_not_chat_formatted(chat_client: TestClient) -> None:
    assert generate(chat_client, prompt=PROBLEM, head=CHAT_HEAD, raw=True)["prompt"] == PROBLEM
    assert generate(chat_client, prompt=PROBLEM, head="math")["prompt"] == f"Problem: {PROBLEM}\nSolution:"
    listed = chat_client.get(f"/heads/{CHAT_HEAD}").json()
    assert (listed["prompt_format"], listed["prompt_template"]) == ("chat", "{problem}")
    assert chat_client.get("/heads/math").json()["prompt_format"] == "plain"


def test_training_encodes_a_chat_heads_prompt_to_the_servers_ids(chat_client: TestClient,
                                                                 chat_base_dir: Path) -> None:
    app: Any = chat_client.app
    runtime, registry = app.state.runtime, app.state.registry
    meta = registry.metadata(CHAT_HEAD)
    job, prompt = asyncio.run(build_job(JobRequest(prompt=PROBLEM, head=CHAT_HEAD, max_new_tokens=4,
                                                   params=SamplingParams()), runtime, registry))
    tokenizer = load_base(str(chat_base_dir)).tokenizer
    (ids, prompt_len), = encode([Example(PROBLEM, "12 + 7 = 19.", "19")], tokenizer, 256, meta.prompt_style)[0]
    assert prompt == RENDERED and job.prompt_ids == ids[:prompt_len]
    assert job.end_ids == (tokenizer.eos_token_id,) and ids[-1] == tokenizer.eos_token_id
    assert PromptStyle("{problem}", "chat").ids(PROBLEM, tokenizer) == job.prompt_ids


def test_logprobs_report_the_chosen_tokens_and_their_alternatives(chat_client: TestClient) -> None:
    r = chat(chat_client, model=CHAT_HEAD, temperature=0, logprobs=True, top_logprobs=2)
    assert r.status_code == 200, r.text
    body = r.json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"]
    for entry in content:
        assert entry["logprob"] <= 0 and 1 <= len(entry["top_logprobs"]) <= 2
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"], abs=1e-5)  # greedy
        assert bytes(entry["bytes"]).decode() == entry["token"]
    bare = chat(chat_client, temperature=0, logprobs=True).json()["choices"][0]["logprobs"]["content"]
    assert all(entry["top_logprobs"] == [] for entry in bare)
    assert chat(chat_client, temperature=0).json()["choices"][0]["logprobs"] is None


@pytest.mark.parametrize(("body", "status", "fragment"), [
    ({"n": 2}, 422, "n must be 1"),
    ({"logit_bias": {"50": 1.0}}, 422, "logit_bias"),
    ({"presence_penalty": 0.5}, 422, "presence_penalty"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 422, "tools"),
    ({"response_format": {"type": "json_object"}}, 422, "response_format"),
    ({"top_logprobs": 2}, 422, "top_logprobs needs logprobs"),
    ({"logprobs": True, "top_logprobs": 9}, 422, "top_logprobs"),
    ({"max_tokens": 4, "max_completion_tokens": 5}, 422, "set one"),
    ({"max_completion_tokens": 10_000}, 422, "max_new_tokens must be between 1 and 64"),
    ({"messages": []}, 422, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 422, "role"),
    ({"messages": [{"role": "user"}]}, 422, "content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 422, "type"),
    ({"messages": [{"role": "user", "content": "x" * 60_000}] * 2}, 422, "120000 characters; at most 100000 in all"),
    ({"messages": [{"role": "user", "content": "x"}] * 257}, 422, "messages"),
    ({"model": "no-such-head"}, 404, "no-such-head"),
    ({"model": "../etc"}, 404, "does not exist"),
])
def test_bad_requests_get_openai_errors(chat_client: TestClient, body: dict[str, Any], status: int,
                                        fragment: str) -> None:
    error = assert_openai_error(chat(chat_client, **body), status, fragment)
    assert error["code"] == ("model_not_found" if status == 404 else None)


def test_content_parts_are_the_same_text(chat_client: TestClient) -> None:
    parts = [{"type": "text", "text": PROBLEM[:10]}, {"type": "text", "text": PROBLEM[10:]}]
    joined = chat(chat_client, temperature=0, messages=[{"role": "user", "content": f"{PROBLEM[:10]}\n{PROBLEM[10:]}"}])
    as_parts = chat(chat_client, temperature=0, messages=[{"role": "user", "content": parts}])
    assert as_parts.status_code == 200 and as_parts.json()["choices"] == joined.json()["choices"]
    assert as_parts.json()["usage"] == joined.json()["usage"]


def test_a_prompt_over_the_token_limit_is_refused_once_rendered(chat_client: TestClient) -> None:
    app: Any = chat_client.app
    runtime = app.state.runtime
    # Fits the character bound as a problem, but not once the template's markers are added around it.
    text = "1" * (runtime.prompt_char_limit - len(RENDERED) + len(PROBLEM) + 1)
    assert_openai_error(chat(chat_client, messages=[{"role": "user", "content": text}]), 422,
                        f"no prompt longer than {runtime.prompt_char_limit} characters")
    r = chat_client.post("/generate", json={"prompt": text})
    assert r.status_code == 422 and "characters once formatted" in r.json()["detail"]


def test_a_base_without_a_chat_template_refuses_chat(plain_client: TestClient) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        in_process(plain_client).chat.completions.create(model="base", messages=[{"role": "user", "content": PROBLEM}])
    assert "no chat template" in str(refused.value) and "/v1/completions" in str(refused.value)
    r = plain_client.post("/generate", json={"prompt": PROBLEM, "head": CHAT_HEAD})
    assert r.status_code == 400 and CHAT_HEAD in r.json()["detail"] and "raw: true" in r.json()["detail"]
    assert generate(plain_client, prompt=PROBLEM, head=CHAT_HEAD, raw=True)["prompt"] == PROBLEM
    assert generate(plain_client, prompt=PROBLEM)["prompt"] == PROBLEM  # the base alone: plain, as ever
    assert json.loads(plain_client.get("/v1/models").text)["data"]  # listing is unaffected


def test_unknown_models_add_no_metric_series(chat_client: TestClient) -> None:
    for i in range(3):
        assert chat(chat_client, model=f"ghost-{i}").status_code == 404
    metrics = chat_client.get("/metrics").text
    assert "ghost" not in metrics and 'route="/v1/chat/completions"' in metrics
