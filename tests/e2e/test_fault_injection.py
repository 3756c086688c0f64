"""Fault injection against the real server process: one hostile request or head never fails another.

Each test plays a hostile or careless client (or operator) against `python -m server` on a free
port: requests whose sampling settings or head overflow, while eight bystanders decode beside
them; bad folders dropped into the registry by hand; storms of concurrent replaces with readers
watching; size bombs; floods of unknown head names. The bystanders' answers must be exactly
what they are alone, and the server must answer every bad input with a 4xx, quickly, at bounded
memory. Crashes (`kill -9`) are in `test_registry_crash.py`, the schema fuzz in `test_schema_fuzz.py`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from heads import BackwardAttentionConfig, BackwardAttentionHead, save_head
from heads.base import load_base
from tests.e2e.serving import Server, serve
from tests.e2e.test_server_process import TEMPLATE, make_head

pytestmark = pytest.mark.slow

BYSTANDER_TOKENS = 160  # long enough that the hostile request lands while every bystander is decoding
BYSTANDERS: list[dict[str, Any]] = [
    {"prompt": f"What is {i} + 7?", "head": "math" if i % 2 else None, "max_new_tokens": BYSTANDER_TOKENS,
     "ignore_eos": True, "stream": i in (3, 6),
     "decoding": {"strategy": "greedy"} if i % 3 == 0 else {"strategy": "top_k", "top_k": 20, "seed": i,
                                                            "temperature": 0.9}}
    for i in range(8)
]
HOSTILE: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny temperature": ("/generate", {"prompt": "What is 2 + 2?", "head": "math", "max_new_tokens": 32,
                                       "decoding": {"strategy": "top_k", "temperature": 1e-38, "seed": 1}}),
    "tiny temperature streamed": ("/generate", {"prompt": "What is 2 + 2?", "max_new_tokens": 32, "stream": True,
                                                "decoding": {"strategy": "top_p", "temperature": 1e-38}}),
    "tiny temperature inherited by a comparison": (
        "/generate", {"prompt": "What is 2 + 2?", "max_new_tokens": 32, "compare": True,
                      "decoding": {"strategy": "greedy", "temperature": 1e-38}}),
    "tiny temperature on /v1": ("/v1/completions", {"model": "math", "prompt": "What is 2 + 2?", "max_tokens": 32,
                                                    "temperature": 1e-38}),
    "head with huge finite weights": ("/generate", {"prompt": "What is 2 + 2?", "head": "overflow",
                                                    "max_new_tokens": 32, "decoding": {"strategy": "top_k"}}),
    "head with huge finite weights on /v1": ("/v1/completions", {"model": "overflow", "prompt": "2 + 2 =",
                                                                 "max_tokens": 32, "stream": True}),
}


def drop_overflowing_head(base_dir: Path, out: Path) -> None:
    """A head whose weights are finite but huge, copied into the registry by hand (uploads would refuse it)."""
    base = load_base(str(base_dir))
    head = BackwardAttentionHead(BackwardAttentionConfig(latent_dim=16), vocab_size=base.vocab_size,
                                 n_embd=base.n_embd)
    with torch.no_grad():
        for p in head.parameters():
            p.fill_(1e30)
    save_head(head, out, base.info(), task="math", prompt_template=TEMPLATE)


@pytest.fixture(scope="module")
def server(lively_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("faults")
    make_head(lively_base_dir, root / "heads" / "math")
    drop_overflowing_head(lively_base_dir, root / "heads" / "overflow")
    with serve(lively_base_dir, root / "heads", root / "server.log") as running:
        yield running


def call(url: str, path: str, body: dict[str, Any], timeout: float = 120.0) -> tuple[int, Any]:
    """(status, answer): the JSON body, or for a stream the list of its events (`[DONE]` as a string)."""
    with httpx.Client(base_url=url, timeout=timeout) as http:
        if not body.get("stream"):
            response = http.post(path, json=body)
            return response.status_code, response.json()
        with http.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                response.read()
                return response.status_code, response.json()
            events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
            return 200, [e if e == "[DONE]" else json.loads(e) for e in events]


def answer_text(status: int, answer: Any) -> str:
    """The text of a /generate answer, streamed or not."""
    assert status == 200, answer
    if isinstance(answer, list):
        assert answer[-1] == "[DONE]", answer[-3:]
        done = [e for e in answer[:-1] if e.get("type") == "done"]
        assert len(done) == 1, [e for e in answer if isinstance(e, dict) and e.get("type") != "token"]
        return str(done[0]["response"]["text"])
    return str(answer["text"])


@pytest.fixture(scope="module")
def alone(server: Server) -> list[str]:
    """What every bystander answers when it runs by itself."""
    return [answer_text(*call(server.url, "/generate", body)) for body in BYSTANDERS]


@pytest.mark.parametrize("hostile", sorted(HOSTILE))
def test_a_hostile_request_never_fails_its_bystanders(server: Server, alone: list[str], hostile: str) -> None:
    path, body = HOSTILE[hostile]
    with ThreadPoolExecutor(len(BYSTANDERS) + 1) as pool:
        bystanders = [pool.submit(call, server.url, "/generate", b) for b in BYSTANDERS]
        time.sleep(0.3)  # every bystander is admitted and decoding
        status, answer = pool.submit(call, server.url, path, body).result()
        together = [answer_text(*f.result()) for f in bystanders]
    assert together == alone
    assert status < 500, answer
    if isinstance(answer, list):  # a stream ends cleanly, with an error event if anything went wrong
        assert answer[-1] == "[DONE]"
        assert all(e.get("status", 400) < 500 for e in answer[:-1] if isinstance(e, dict) and "status" in e)
    elif status != 200:
        detail = answer.get("detail") or answer["error"]["message"]
        assert "overflow" in detail and "internal" not in detail


def test_tiny_temperatures_decode_greedily(server: Server) -> None:
    """Below the temperature floor sampling is greedy (docs/api.md), not a division by almost zero."""
    greedy = call(server.url, "/generate", {"prompt": "What is 2 + 2?", "head": "math", "max_new_tokens": 32})
    for strategy in ("top_k", "top_p"):
        tiny = call(server.url, "/generate", {"prompt": "What is 2 + 2?", "head": "math", "max_new_tokens": 32,
                                              "decoding": {"strategy": strategy, "temperature": 1e-38, "seed": 3}})
        assert answer_text(*tiny) == answer_text(*greedy)


def test_an_overflowing_head_is_refused_with_its_reason(server: Server) -> None:
    """Its files are fine, so the first load finds it out (probe logits) and the listing says so from then on."""
    status, answer = call(server.url, "/generate", {"prompt": "2 + 2 =", "head": "overflow"})
    assert status == 409 and "overflow" in answer["detail"]
    with server.client() as client:
        listed = {h.name: h for h in client.list_heads()}
    assert listed["math"].status == "ready"
    assert listed["overflow"].status == "invalid" and listed["overflow"].error


def test_clients_that_go_away_free_their_slots(server: Server) -> None:
    """Non-streaming clients that disconnect stop costing the batch within a step, as streaming ones do."""
    def metric(name: str) -> float:
        text = httpx.get(f"{server.url}/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))

    abandoned, generated = metric("headserve_abandoned_requests_total"), metric("headserve_generated_tokens_total")
    requests, tokens = 6, 250
    body = {"prompt": "What is 1 + 1?", "max_new_tokens": tokens, "ignore_eos": True, "compare": True}

    def give_up() -> None:
        with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=server.url, timeout=0.1) as http:
            http.post("/generate", json=body)  # 18 sequences of ~240 tokens take far longer than 0.1 s

    with ThreadPoolExecutor(requests) as pool:
        for done in [pool.submit(give_up) for _ in range(requests)]:
            done.result()
    deadline = time.monotonic() + 10
    while metric("headserve_abandoned_requests_total") < abandoned + requests:
        assert time.monotonic() < deadline, "the abandoned requests were never dropped"
        time.sleep(0.05)
    time.sleep(0.2)
    assert metric("headserve_active_sequences") == 0
    spent = metric("headserve_generated_tokens_total") - generated
    assert spent < requests * 3 * tokens / 2, f"{spent:.0f} tokens were generated for clients that had gone"


def bad_folders(registry: Path) -> dict[str, str]:
    """Broken heads a careless operator might copy into the registry, by name -> what is wrong."""
    good = json.loads((registry / "math" / "head_config.json").read_text())
    weights = (registry / "math" / "head.safetensors").read_bytes()
    deep = '{"x": ' * 980 + "{}" + "}" * 980  # written by hand: json.dumps itself would recurse too deep
    variants = {
        "config-list": (json.dumps({**good, "config": [1, 2]}), "config"),
        "config-null": (json.dumps({**good, "config": None}), "config"),
        "config-deep": (json.dumps({**good, "config": "DEEP"}).replace('"DEEP"', deep), "deep"),
        "training-deep": (json.dumps({**good, "training": "DEEP"}).replace('"DEEP"', deep), "deep"),
        "latent-bomb": (json.dumps({**good, "config": {**good["config"], "latent_dim": 10_000_000}}), "latent_dim"),
    }
    for name, (config, _) in variants.items():
        (registry / name).mkdir()
        (registry / name / "head_config.json").write_text(config)
        (registry / name / "head.safetensors").write_bytes(weights)
    (registry / "huge-weights").mkdir()
    (registry / "huge-weights" / "head_config.json").write_text(json.dumps(good))
    with open(registry / "huge-weights" / "head.safetensors", "wb") as f:
        f.truncate(2 * 1024**3)  # 2 GiB, sparse: costs nothing on disk, but a fortune to read and parse
    return {**{name: why for name, (_, why) in variants.items()}, "huge-weights": "safetensors"}


def test_bad_folders_are_listed_invalid_and_cost_one_load(lively_base_dir: Path, tmp_path: Path) -> None:
    registry = tmp_path / "heads"
    make_head(lively_base_dir, registry / "math")
    bad = bad_folders(registry)
    (registry / "Not A Name").mkdir()
    with serve(lively_base_dir, registry, tmp_path / "server.log") as running, running.client() as client:
        listed = {h.name: h for h in client.list_heads()}
        assert listed["math"].status == "ready"
        for name, why in bad.items():
            assert listed[name].status == "invalid", name
            assert why in (listed[name].error or ""), (name, listed[name].error)
        assert "Not A Name" not in listed
        models = httpx.get(f"{running.url}/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["base", "math"]

        # Sixty requests for the 2 GiB head: one failed load (remembered), never a starved /healthz.
        with ThreadPoolExecutor(60) as pool:
            answers = [pool.submit(call, running.url, "/generate", {"prompt": "1 + 1 =", "head": "huge-weights"})
                       for _ in range(60)]
            start = time.perf_counter()
            health = httpx.get(f"{running.url}/healthz", timeout=30)
            health_s = time.perf_counter() - start
            statuses = {a.result()[0] for a in answers}
        assert health.status_code == 200 and health_s < 5.0, health_s
        assert statuses == {409}
        for name in bad:
            assert call(running.url, "/generate", {"prompt": "1 + 1 =", "head": name})[0] == 409
    assert (tmp_path / "server.log").read_text().count("'huge-weights'") <= 2  # logged once, not per request


def test_replace_storm_with_readers(server: Server, lively_base_dir: Path, tmp_path: Path) -> None:
    """Ten writers replace one name at once while readers watch it: every write 201, every read 200."""
    sources = [make_head(lively_base_dir, tmp_path / f"v{i}", seed=i) for i in range(10)]
    with server.client() as client:
        client.register_head(sources[0], name="storm", replace=True)
    stop, reads = threading.Event(), []

    def read() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            while not stop.is_set():
                reads.append(http.get("/heads/storm").status_code)
                reads.append(http.post("/generate", json={"prompt": "1 + 1 =", "head": "storm",
                                                          "max_new_tokens": 4}).status_code)

    def write(source: Path) -> int:
        with server.client() as client:
            return min(client.register_head(source, name="storm", replace=True).bytes for _ in range(3))

    readers = [threading.Thread(target=read) for _ in range(4)]
    for r in readers:
        r.start()
    try:
        with ThreadPoolExecutor(10) as pool:
            written = list(pool.map(write, sources))
    finally:
        stop.set()
        for r in readers:
            r.join()
    assert all(w > 0 for w in written)
    assert reads and set(reads) == {200}, sorted(set(reads))
    leftovers = [p.name for p in server.heads_dir.iterdir() if p.name.startswith(".storm")]
    assert leftovers == []


def test_size_bombs_are_refused_fast_at_bounded_memory(server: Server, lively_base_dir: Path) -> None:
    config = json.loads((server.heads_dir / "math" / "head_config.json").read_text())
    weights = (server.heads_dir / "math" / "head.safetensors").read_bytes()
    bombs: list[tuple[str, Any]] = [
        ("/v1/completions", {"model": "base", "prompt": "7" * 20_000_000, "max_tokens": 4}),
        ("/generate", {"prompt": "7 " * 10_000_000, "max_new_tokens": 4}),
        ("/v1/completions", {"model": "base", "prompt": "1 + 1 =", "stop": "x" * 100_000}),
        ("/v1/completions", {"model": "base", "prompt": [7] * 2_000_000}),
        ("/generate", {"prompt": "1 + 1 =", "stop": ["y" * 100_000]}),
    ]
    peak = server.peak_rss_bytes()
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for path, body in bombs:
            start = time.perf_counter()
            response = http.post(path, json=body)
            took = time.perf_counter() - start
            assert response.status_code in (413, 422), (path, response.status_code)
            assert took < 10.0, (path, took)
        for name, bomb in [("bomb-latent", {**config, "config": {**config["config"], "latent_dim": 10_000_000}}),
                           ("bomb-heads", {**config, "config": {**config["config"], "num_heads": 1_000_000}})]:
            start = time.perf_counter()
            response = http.post("/heads", data={"name": name},
                                 files={"config": json.dumps(bomb).encode(), "weights": weights})
            assert response.status_code == 422, response.text
            assert "latent_dim" in response.text or "num_heads" in response.text
            assert time.perf_counter() - start < 10.0
            assert http.get(f"/heads/{name}").status_code == 404
    grown = server.peak_rss_bytes() - peak
    assert grown < 300 * 1024**2, f"the bombs grew the server's peak memory by {grown / 1024**2:.0f} MiB"


def test_unknown_head_names_add_no_metric_series(server: Server) -> None:
    def lines() -> int:
        return len(httpx.get(f"{server.url}/metrics").text.splitlines())

    with httpx.Client(base_url=server.url, timeout=60) as http:
        http.post("/generate", json={"prompt": "1 + 1 =", "head": "warm-up-unknown"})
        http.post("/v1/completions", json={"model": "warm-up-unknown", "prompt": "1 + 1 ="})
        before = lines()
        for i in range(250):
            assert http.post("/generate", json={"prompt": "1 + 1 =", "head": f"nope-{i}"}).status_code == 404
            assert http.post("/v1/completions", json={"model": f"nope-{i}", "prompt": "1"}).status_code == 404
            http.get(f"/heads/nope-{i}")
    text = httpx.get(f"{server.url}/metrics").text
    assert lines() == before
    assert "nope-" not in text and 'head="unknown"' in text
