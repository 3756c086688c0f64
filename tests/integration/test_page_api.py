"""What the comparison page reads besides the answer: the server's limits on /readyz, and each token's alternatives."""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi.testclient import TestClient

from server.schemas import MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_TOP_LOGPROBS

BODY = {"prompt": "Ava has 3 apples", "head": "math", "max_new_tokens": 8, "compare": True}


def token_events(client: TestClient, **body: Any) -> list[dict[str, Any]]:
    with client.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        frames = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    return [e for e in (json.loads(f) for f in frames if f != "[DONE]") if e["type"] == "token"]


def test_readyz_tells_the_limits_a_form_must_respect(lively_client: TestClient) -> None:
    limits = lively_client.get("/readyz").json()["limits"]
    runtime = lively_client.app.state.runtime  # type: ignore[attr-defined]
    assert limits == {"max_new_tokens": 64, "max_prompt_tokens": runtime.prompt_token_limit,
                      "max_stop_strings": MAX_STOP_STRINGS, "max_stop_chars": MAX_STOP_CHARS,
                      "max_top_logprobs": MAX_TOP_LOGPROBS}
    # The advertised bound is the one enforced: at it accepted, one above refused.
    ok = lively_client.post("/generate", json={"prompt": "x", "max_new_tokens": limits["max_new_tokens"]})
    assert ok.status_code == 200
    over = lively_client.post("/generate", json={"prompt": "x", "max_new_tokens": limits["max_new_tokens"] + 1})
    assert over.status_code == 422


def test_top_logprobs_lists_the_most_likely_tokens_with_the_chosen_one_first_when_greedy(
        lively_client: TestClient) -> None:
    out = lively_client.post("/generate", json={**BODY, "return_logprobs": True, "top_logprobs": 3}).json()
    assert len(out["logprobs"]) == out["tokens"] == 8
    for item in out["logprobs"]:
        top = item["top"]
        assert len(top) == 3
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert top[0]["token_id"] == item["token_id"] and math.isclose(top[0]["logprob"], item["logprob"],
                                                                       abs_tol=1e-5)
        assert len({t["token_id"] for t in top}) == 3
    plain = lively_client.post("/generate", json={**BODY, "return_logprobs": True}).json()
    assert plain["text"] == out["text"]  # asking for alternatives changes nothing else
    assert all(item["top"] is None for item in plain["logprobs"])


def test_every_decoders_stream_events_carry_alternatives_only_when_asked(lively_client: TestClient) -> None:
    events = token_events(lively_client, **BODY, top_logprobs=2, decoding={"strategy": "top_k", "seed": 5})
    assert {e["decoder"] for e in events} == {"main", "linear_greedy", "linear_top_k"}
    for e in events:
        assert len(e["top"]) == 2 and e["top"][0]["logprob"] >= e["top"][1]["logprob"]
        assert e["logprob"] <= e["top"][0]["logprob"] + 1e-5  # nothing is more likely than the most likely
        if e["decoder"] == "linear_greedy":
            assert e["top"][0]["token_id"] == e["token_id"]
    assert all("top" not in e for e in token_events(lively_client, **BODY))


def test_top_logprobs_is_bounded(lively_client: TestClient) -> None:
    r = lively_client.post("/generate", json={**BODY, "top_logprobs": MAX_TOP_LOGPROBS + 1})
    assert r.status_code == 422 and "top_logprobs" in r.text
