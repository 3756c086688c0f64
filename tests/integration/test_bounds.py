"""Sizes a client controls are bounded before the server pays for them (issue 10, item 4).

A 20 MB body, a prompt that cannot fit, long or many stop strings, long token-id lists: each is
refused with a 4xx quickly, and a prompt is never tokenised when its length alone says it cannot fit.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from heads.base import Base
from server.openai_schemas import MAX_PROMPTS
from server.schemas import MAX_STOP_CHARS, MAX_STOP_STRINGS

BOMB = "1 + 1 = 2. " * 2_000_000  # 22 MB of text that tokenises slowly into millions of tokens
QUICK_S = 5.0  # generous: the point is seconds, not the minute a 20 MB prompt used to cost


@pytest.fixture
def tokenised(lively_client: TestClient, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The length of every text the base's tokenizer is asked to encode while the test runs."""
    tokenizer = lively_client.app.state.runtime.base.tokenizer  # type: ignore[attr-defined]
    cls, lengths = type(tokenizer), []
    real = cls.__call__

    def recording(self: Any, text: Any = None, *args: Any, **kwargs: Any) -> Any:
        lengths.append(len(text) if isinstance(text, str) else sum(len(t) for t in text))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", recording)
    yield lengths


def runtime_of(client: TestClient) -> Any:
    return client.app.state.runtime  # type: ignore[attr-defined]


def post(client: TestClient, route: str, **body: Any) -> Any:
    if route == "/v1/completions":
        body = {"model": "base", "max_tokens": 2, **body}
    else:
        body = {"max_new_tokens": 2, **body}
    return client.post(route, json=body)


def detail_of(response: Any) -> str:
    body = response.json()
    return str(body["error"]["message"] if "error" in body else body["detail"])


@pytest.mark.parametrize("route", ["/generate", "/v1/completions"])
def test_a_20_mb_body_is_413_at_once_and_never_tokenised(lively_client: TestClient, tokenised: list[int],
                                                         route: str) -> None:
    started = time.monotonic()
    r = post(lively_client, route, prompt=BOMB)
    assert time.monotonic() - started < QUICK_S
    assert r.status_code == 413, r.text
    assert "MAX_REQUEST_BYTES" in detail_of(r)
    assert tokenised == []


@pytest.mark.parametrize("route", ["/generate", "/v1/completions"])
def test_a_chunked_body_without_length_is_cut_off_while_it_streams(lively_client: TestClient, route: str) -> None:
    body = json.dumps({"model": "base", "prompt": BOMB[:3_000_000]} if route.startswith("/v1") else
                      {"prompt": BOMB[:3_000_000]}).encode()
    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 64 * 1024):
            yield body[i:i + 64 * 1024]

    r = lively_client.post(route, content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert "content-length" not in {k.lower() for k in r.request.headers}


@pytest.mark.parametrize(("route", "extra"), [
    ("/generate", {"raw": True}), ("/generate", {"head": "math"}), ("/v1/completions", {}),
    ("/v1/completions", {"model": "math"}),
])
def test_a_prompt_too_long_to_fit_is_refused_without_tokenising_it(lively_client: TestClient, tokenised: list[int],
                                                                   route: str, extra: dict[str, Any]) -> None:
    runtime = runtime_of(lively_client)
    prompt = "7" * 90_000  # under the body and schema caps, far over what 255 tokens can spell
    assert runtime.prompt_char_limit < len(prompt)
    started = time.monotonic()
    r = post(lively_client, route, prompt=prompt, **extra)
    assert time.monotonic() - started < QUICK_S
    assert r.status_code == 422, r.text
    assert f"{runtime.prompt_char_limit} characters" in detail_of(r)
    assert all(n <= runtime.prompt_char_limit for n in tokenised), tokenised


def test_many_prompts_of_a_v1_request_are_each_bounded(lively_client: TestClient, tokenised: list[int]) -> None:
    runtime = runtime_of(lively_client)
    r = post(lively_client, "/v1/completions", prompt=["Sam", "9" * (runtime.prompt_char_limit + 1)])
    assert r.status_code == 422 and "characters" in detail_of(r)
    assert max(tokenised, default=0) <= runtime.prompt_char_limit


def test_the_character_bound_never_refuses_a_prompt_that_fits(lively_base: Base) -> None:
    """n characters need at least n / longest_token_chars tokens, whatever the text (special tokens included)."""
    from server.limits import longest_token_chars

    longest = longest_token_chars(lively_base.tokenizer)
    vocab = lively_base.tokenizer.convert_ids_to_tokens(list(range(len(lively_base.tokenizer))))
    assert longest == max(len(t) for t in vocab)
    samples = ["<|endoftext|>" * 40, "Problem: Ava has 3 apples\nSolution:" * 20, "é€😀 " * 50, "1234567890" * 30,
               " " * 300, "".join(sorted(set("".join(vocab))))]
    for text in samples:
        assert len(lively_base.tokenizer(text)["input_ids"]) * longest >= len(text), text[:40]


@pytest.mark.parametrize("route", ["/generate", "/v1/completions"])
def test_stop_strings_share_one_bound_on_both_routes(lively_client: TestClient, route: str) -> None:
    long = "x" * (MAX_STOP_CHARS + 1)
    for stop in ([long], ["a"] * (MAX_STOP_STRINGS + 1), [""]):
        r = post(lively_client, route, prompt="Sam", stop=stop)
        assert r.status_code == 422 and "stop" in detail_of(r), (stop, r.text)
    ok = post(lively_client, route, prompt="Sam", stop=["y" * MAX_STOP_CHARS] * MAX_STOP_STRINGS)
    assert ok.status_code == 200, ok.text


def test_a_single_v1_stop_string_is_bounded_too(lively_client: TestClient) -> None:
    for stop in ("x" * (MAX_STOP_CHARS + 1), "x" * 1_000_000):
        r = post(lively_client, "/v1/completions", prompt="Sam", stop=stop)
        assert r.status_code in (413, 422), r.text
    assert post(lively_client, "/v1/completions", prompt="Sam", stop="y" * MAX_STOP_CHARS).status_code == 200


def test_numeric_strings_are_many_text_prompts_never_token_ids(lively_client: TestClient, lively_base: Base) -> None:
    prompts = [str(i) for i in range(MAX_PROMPTS)]
    out = post(lively_client, "/v1/completions", prompt=prompts, max_tokens=1, temperature=0)
    assert out.status_code == 200, out.text
    body = out.json()
    assert [c["index"] for c in body["choices"]] == list(range(MAX_PROMPTS))
    as_text = sum(len(lively_base.tokenizer(p)["input_ids"]) for p in prompts)
    assert body["usage"]["prompt_tokens"] == as_text  # read as 32 ids, it would be one choice of 32 tokens
    r = post(lively_client, "/v1/completions", prompt=[str(i) for i in range(MAX_PROMPTS + 1)])
    assert r.status_code == 422 and f"at most {MAX_PROMPTS}" in detail_of(r), r.text
    one = post(lively_client, "/v1/completions", prompt=list(range(40)), max_tokens=1)  # ints: one tokenised prompt
    assert one.status_code == 200 and len(one.json()["choices"]) == 1 and one.json()["usage"]["prompt_tokens"] == 40


def test_token_id_lists_are_bounded(lively_client: TestClient, tokenised: list[int]) -> None:
    limit = runtime_of(lively_client).prompt_token_limit
    r = post(lively_client, "/v1/completions", prompt=[1] * (limit + 1))
    assert r.status_code == 422 and f"limit is {limit}" in detail_of(r)
    r = post(lively_client, "/v1/completions", prompt=[[1] * (limit + 1)])
    assert r.status_code == 422 and f"limit is {limit}" in detail_of(r)
    r = post(lively_client, "/v1/completions", prompt=[[1, 2]] * (MAX_PROMPTS + 1))
    assert r.status_code == 422 and f"at most {MAX_PROMPTS}" in detail_of(r)
    r = post(lively_client, "/v1/completions", prompt=[True, False])  # JSON booleans are not token ids
    assert r.status_code == 422
    assert tokenised == []


def test_logprobs_are_bounded(lively_client: TestClient) -> None:
    assert post(lively_client, "/v1/completions", prompt="Sam", logprobs=6).status_code == 422
    assert post(lively_client, "/v1/completions", prompt="Sam", logprobs=5).status_code == 200


@pytest.mark.parametrize("route", ["/generate", "/v1/completions"])
def test_deeply_nested_json_is_a_4xx_not_a_500(lively_client: TestClient, route: str) -> None:
    body = b'{"prompt": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    r = lively_client.post(route, content=body, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text

