"""Metric label values come only from registered heads (issue 10, item 5).

Any client could once add ~19 series per made-up head name, for ever. Now every name the registry
does not resolve shares the label `unknown`, and a deleted head's series go with it.
"""

from __future__ import annotations

import shutil

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import UNKNOWN_LABEL


def series(client: TestClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = client.get("/metrics").text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def hostile_round(client: TestClient, i: int) -> list[int]:
    """Six requests naming heads that do not exist, in every place a head can be named."""
    return [
        client.post("/generate", json={"prompt": "x", "head": f"ghost-{i}", "max_new_tokens": 1}).status_code,
        client.post("/v1/completions", json={"model": f"ghost-{i}", "prompt": "x", "max_tokens": 1}).status_code,
        client.post("/v1/completions", json={"model": f"Not A Head {i}!", "prompt": "x"}).status_code,
        client.get(f"/heads/ghost-{i}").status_code,
        client.get(f"/heads/BAD-{i}").status_code,
        client.delete(f"/heads/ghost-{i}").status_code,
    ]


def test_requests_naming_unknown_heads_add_no_series(lively_client: TestClient) -> None:
    assert hostile_round(lively_client, 0) == [404, 404, 404, 404, 422, 404]
    lively_client.get("/metrics")  # reading /metrics is a request too: its own series exist from here on
    lines_before = lively_client.get("/metrics").text.count("\n")
    rounds = 84  # 504 requests
    for i in range(1, rounds + 1):
        hostile_round(lively_client, i)
    text = lively_client.get("/metrics").text
    assert text.count("\n") == lines_before
    assert "ghost" not in text and "BAD" not in text and "Not A Head" not in text
    values = series(lively_client)
    # route templates, not methods: GET and DELETE /heads/{name} share a series
    for route, status, per_round in (("/generate", "404", 1), ("/v1/completions", "404", 2),
                                     ("/heads/{name}", "404", 2), ("/heads/{name}", "422", 1)):
        key = ("headserve_requests_total", frozenset({("route", route), ("head", UNKNOWN_LABEL), ("status", status)}))
        assert values[key] == per_round * (rounds + 1), (route, status)


def test_a_registered_head_is_labelled_by_name_once_resolved(lively_client: TestClient) -> None:
    assert lively_client.post("/generate", json={"prompt": "x", "head": "math", "max_new_tokens": 1}).status_code == 200
    assert lively_client.get("/heads/math").status_code == 200
    values = series(lively_client)
    for route in ("/generate", "/heads/{name}"):
        key = ("headserve_requests_total", frozenset({("route", route), ("head", "math"), ("status", "200")}))
        assert values[key] >= 1, route


def test_deleting_a_head_drops_its_series(lively_client: TestClient) -> None:
    root = lively_client.app.state.registry.root  # type: ignore[attr-defined]
    shutil.copytree(root / "math", root / "short-lived")
    r = lively_client.post("/generate", json={"prompt": "x", "head": "short-lived", "max_new_tokens": 2})
    assert r.status_code == 200
    assert lively_client.get("/heads/short-lived").status_code == 200
    assert 'head="short-lived"' in lively_client.get("/metrics").text
    assert lively_client.delete("/heads/short-lived").status_code == 204
    text = lively_client.get("/metrics").text
    assert 'head="short-lived"' not in text
    assert 'head="math"' in text  # other heads keep theirs
