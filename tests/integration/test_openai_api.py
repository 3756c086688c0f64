"""`/v1/models` and `/v1/completions` through TestClient: results equal to /generate, errors in OpenAI's shape."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from fastapi.testclient import TestClient

from heads.base import Base

PROMPT = "Problem: Ava has 3 apples\nSolution:"


def complete(lively_client: TestClient, **body: Any) -> dict[str, Any]:
    r = lively_client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def generate_raw(lively_client: TestClient, prompt: str, head: str | None, n: int) -> dict[str, Any]:
    r = lively_client.post("/generate", json={"prompt": prompt, "head": head, "raw": True, "max_new_tokens": n})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def assert_openai_error(r: Any, status: int, *fragments: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for fragment in fragments:
        assert fragment in error["message"], error
    return error  # type: ignore[no-any-return]


def test_models_list_the_base_and_every_loadable_head(lively_client: TestClient, lively_base: Base) -> None:
    body = lively_client.get("/v1/models").json()
    assert body["object"] == "list"
    models = {m["id"]: m for m in body["data"]}
    assert set(models) == {"base", "math"}
    assert models["base"]["parent"] is None and models["math"]["parent"] == lively_base.name
    assert all(m["object"] == "model" and isinstance(m["created"], int) for m in models.values())
    assert lively_client.get("/v1/models/math").json()["id"] == "math"
    assert_openai_error(lively_client.get("/v1/models/nope"), 404, "nope")


@pytest.mark.parametrize("model", ["base", "math"])
def test_greedy_completion_equals_generate_with_a_raw_prompt(lively_client: TestClient, lively_base: Base,
                                                             model: str) -> None:
    out = complete(lively_client, model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    same = generate_raw(lively_client, PROMPT, None if model == "base" else model, 12)
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-") and out["model"] == model
    (choice,) = out["choices"]
    assert choice["index"] == 0 and choice["text"] == same["text"] and choice["logprobs"] is None
    assert choice["finish_reason"] == ("length" if same["finish_reason"] == "length" else "stop")
    prompt_tokens = len(lively_base.tokenizer(PROMPT)["input_ids"])
    assert out["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": same["tokens"],
                            "total_tokens": prompt_tokens + same["tokens"]}


def test_a_list_of_prompts_gives_one_choice_each_in_order(lively_client: TestClient, lively_base: Base) -> None:
    prompts = ["Sam", PROMPT, "Ben buys 12"]
    out = complete(lively_client, model="math", prompt=prompts, max_tokens=8, temperature=0)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    for prompt, choice in zip(prompts, out["choices"], strict=True):
        assert choice["text"] == generate_raw(lively_client, prompt, "math", 8)["text"]
    ids = lively_base.tokenizer("Sam")["input_ids"]
    by_ids = complete(lively_client, model="math", prompt=ids, max_tokens=8, temperature=0)
    assert by_ids["choices"][0]["text"] == out["choices"][0]["text"]
    batch = complete(lively_client, model="math", prompt=[ids, ids], max_tokens=8, temperature=0)
    assert [c["text"] for c in batch["choices"]] == [out["choices"][0]["text"]] * 2


def test_logprobs_report_the_chosen_token_and_its_most_likely_alternatives(lively_client: TestClient) -> None:
    out = complete(lively_client, model="math", prompt=PROMPT, max_tokens=10, temperature=0, logprobs=3)
    choice = out["choices"][0]
    logprobs = choice["logprobs"]
    n = out["usage"]["completion_tokens"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == n
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"] == sorted(logprobs["text_offset"])
    for token, chosen, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"],
                                  strict=True):
        assert 1 <= len(top) <= 3 and chosen <= 0
        assert math.isclose(max(top.values()), chosen, abs_tol=1e-5)  # greedy picks the most likely token
        assert token in top
    assert math.fsum(math.exp(v) for v in logprobs["top_logprobs"][0].values()) <= 1 + 1e-5
    plain = complete(lively_client, model="math", prompt=PROMPT, max_tokens=10, temperature=0, logprobs=0)
    assert plain["choices"][0]["logprobs"]["top_logprobs"] is None


def test_seeded_sampling_repeats_and_seeds_differ(lively_client: TestClient) -> None:
    runs = [complete(lively_client, model="base", prompt="Sam", max_tokens=16, temperature=1.0,
                     seed=s)["choices"][0]["text"]
            for s in (5, 5, 6, 7)]
    assert runs[0] == runs[1] and len(set(runs)) >= 2
    top_k = complete(lively_client, model="base", prompt="Sam", max_tokens=16, temperature=0.8, top_k=5, seed=5)
    assert top_k["choices"][0]["text"] == complete(lively_client, model="base", prompt="Sam", max_tokens=16,
                                                   temperature=0.8, top_k=5, seed=5)["choices"][0]["text"]


def stream_chunks(lively_client: TestClient, **body: Any) -> list[Any]:
    with lively_client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        frames = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert frames[-1] == "[DONE]"
    return [json.loads(f) for f in frames[:-1]]


def test_streaming_chunks_add_up_to_the_completion(lively_client: TestClient) -> None:
    whole = complete(lively_client, model="math", prompt=[PROMPT, "Sam"], max_tokens=12, temperature=0, logprobs=1)
    chunks = stream_chunks(lively_client, model="math", prompt=[PROMPT, "Sam"], max_tokens=12, temperature=0,
                           logprobs=1, stream_options={"include_usage": True})
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "text_completion" for c in chunks)
    *token_chunks, usage = chunks
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    for index, choice in enumerate(whole["choices"]):
        mine = [c["choices"][0] for c in token_chunks if c["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert [c["finish_reason"] for c in mine][-1] == choice["finish_reason"]
        assert all(c["finish_reason"] is None for c in mine[:-1])
        assert all(len(c["logprobs"]["tokens"]) == 1 for c in mine)
        for field in ("tokens", "token_logprobs", "text_offset"):  # the same logprobs, token by token
            assert [x for c in mine for x in c["logprobs"][field]] == choice["logprobs"][field]
    no_usage = stream_chunks(lively_client, model="base", prompt="Sam", max_tokens=3, temperature=0)
    assert all("usage" not in c for c in no_usage)


@pytest.mark.parametrize(("body", "fragment"), [
    ({"n": 2}, "n must be 1"),
    ({"echo": True}, "echo"),
    ({"best_of": 3}, "best_of"),
    ({"logit_bias": {"50": 1.0}}, "logit_bias"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"logprobs": 9}, "logprobs"),
    ({"temperature": 3}, "temperature"),
    ({"max_tokens": 10_000}, "max_new_tokens must be between 1 and 64"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"stop": ""}, "stop"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"top_k": 5, "top_p": 0.5, "temperature": 1}, "not both"),
    ({"prompt": [10**9]}, "token ids"),
])
def test_bad_requests_get_a_422_in_openai_shape(lively_client: TestClient, body: dict[str, Any], fragment: str) -> None:
    r = lively_client.post("/v1/completions", json={"model": "base", "prompt": "Sam", **body})
    error = assert_openai_error(r, 422, fragment)
    assert error["type"] == "invalid_request_error"


def test_unknown_models_and_routes_are_404_in_openai_shape(lively_client: TestClient) -> None:
    for model in ("nope", "Not A Head!", "broken"):
        r = lively_client.post("/v1/completions", json={"model": model, "prompt": "Sam"})
        error = assert_openai_error(r, 404)
        assert error["code"] == "model_not_found" and model in error["message"]
    assert_openai_error(lively_client.get("/v1/nothing-here"), 404)
    r = lively_client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_openai_error(r, 422, "not valid JSON")
    assert "detail" in lively_client.post("/generate", json={"prompt": "x", "head": "nope"}).json()  # ours stays ours


def test_queue_full_is_a_429_in_openai_shape(lively_client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lively_client.app.state.runtime.engine, "max_queue", 0)  # type: ignore[attr-defined]
    r = lively_client.post("/v1/completions", json={"model": "base", "prompt": "Sam"})
    error = assert_openai_error(r, 429, "queue is full")
    assert error["type"] == "rate_limit_error" and r.headers["retry-after"]


@pytest.mark.usefixtures("third_step_fails")
def test_an_engine_failure_mid_stream_arrives_as_an_openai_error_event(lively_client: TestClient) -> None:
    with lively_client.stream("POST", "/v1/completions", json={"model": "base", "prompt": "Sam", "max_tokens": 10,
                                                        "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200
        frames = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert frames[-1] == "[DONE]"
    *chunks, error = [json.loads(f) for f in frames[:-1]]
    assert len(chunks) == 2 and all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert error == {"error": {"message": "internal server error", "type": "server_error", "param": None,
                               "code": None}}
