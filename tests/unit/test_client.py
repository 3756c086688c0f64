"""Request building and error mapping of `clients/`, checked precisely against a mock transport.

Behaviour against a real server lives in tests/integration/test_client_inprocess.py and
tests/e2e/test_server_process.py; here only what goes over the wire, and what comes back typed.
"""

from __future__ import annotations

import asyncio
import email.utils
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from clients import (
    AsyncHeadserveClient,
    ConflictError,
    ForbiddenError,
    GenerateResult,
    HeadNotFoundError,
    HeadserveClient,
    HeadserveConnectionError,
    HeadserveError,
    InvalidRequestError,
    NotReadyError,
    PayloadTooLargeError,
    QueueFullError,
    ServerError,
    UnauthorizedError,
)
from tests.unit.client_fakes import GENERATED, SUMMARY, Recorder, make_client, multipart_parts, sent_json

# --- generate -------------------------------------------------------------------------------------------------------

def test_generate_minimal_body_and_typed_result() -> None:
    rec = Recorder(body=GENERATED)
    result = make_client(rec).generate("What is 12 + 7?")
    assert rec.last.method == "POST" and str(rec.last.url) == "http://headserve.test/generate"
    assert sent_json(rec.last) == {"prompt": "What is 12 + 7?"}
    assert "authorization" not in rec.last.headers
    assert isinstance(result, GenerateResult)
    assert (result.text, result.tokens, result.finish_reason, result.head) == (" 12 + 7 = 19.", 7, "eos", "math")
    assert result.prompt == "Problem: What is 12 + 7?\nSolution:"
    assert result.timings.total_s == 0.2 and result.timings.tokens_per_s == 35.0
    assert result.logprobs is not None and result.logprobs[0].token_id == 123 and result.logprobs[0].logprob == -0.01
    assert result.comparisons is not None
    assert [(c.decoder, c.tokens, c.finish_reason) for c in result.comparisons] == [
        ("linear_greedy", 2, "eos"), ("linear_top_k", 4, "length")]


def test_generate_full_body() -> None:
    rec = Recorder(body=GENERATED)
    make_client(rec).generate("2 + 2?", "math", max_new_tokens=32, strategy="top_k", top_k=20, top_p=0.9,
                              temperature=0.7, seed=3, stop=["\n\n", "Problem:"], compare=True, raw=True,
                              return_logprobs=True)
    assert sent_json(rec.last) == {
        "prompt": "2 + 2?", "head": "math", "max_new_tokens": 32,
        "decoding": {"strategy": "top_k", "top_k": 20, "top_p": 0.9, "temperature": 0.7, "seed": 3},
        "stop": ["\n\n", "Problem:"], "compare": True, "raw": True, "return_logprobs": True,
    }


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"seed": 0}, {"decoding": {"seed": 0}}),  # 0 is a value, not "unset"
    ({"compare": ["greedy"]}, {"compare": ["greedy"]}),
    ({"compare": "top_k"}, {"compare": ["top_k"]}),
    ({"compare": False, "raw": False, "return_logprobs": False}, {}),
    ({"stop": "\n"}, {"stop": ["\n"]}),
    ({"stop": []}, {"stop": []}),
])
def test_generate_optional_fields(kwargs: dict[str, Any], expected: dict[str, Any]) -> None:
    rec = Recorder(body={**GENERATED, "logprobs": None, "comparisons": None})
    result = make_client(rec).generate("p", **kwargs)
    assert sent_json(rec.last) == {"prompt": "p", **expected}
    assert result.logprobs is None and result.comparisons is None


def test_unknown_response_fields_are_ignored() -> None:
    rec = Recorder(body={**GENERATED, "something_new": 1, "timings": {**GENERATED["timings"], "extra_s": 1.0}})
    assert make_client(rec).generate("p").tokens == 7


# --- heads ----------------------------------------------------------------------------------------------------------

def test_register_head_sends_multipart(head_folder: Path) -> None:
    rec = Recorder(status=201, body=SUMMARY)
    summary = make_client(rec).register_head(head_folder, "math2")
    assert rec.last.method == "POST" and str(rec.last.url) == "http://headserve.test/heads"
    parts = multipart_parts(rec.last)
    assert parts == {
        "name": (None, None, b"math2"),
        "config": ("head_config.json", "application/json", (head_folder / "head_config.json").read_bytes()),
        "weights": ("head.safetensors", "application/octet-stream", (head_folder / "head.safetensors").read_bytes()),
    }
    assert summary.name == "math" and summary.bytes == 1234 and summary.training["final_metrics"] == {"loss": 1.5}


def test_register_head_replace_and_default_name(head_folder: Path) -> None:
    rec = Recorder(status=201, body=SUMMARY)
    make_client(rec).register_head(head_folder, replace=True)
    assert rec.last.url.params["replace"] == "true"
    assert multipart_parts(rec.last)["name"][2] == b"my-head"


def test_register_head_missing_file(head_folder: Path) -> None:
    (head_folder / "head.safetensors").unlink()
    rec = Recorder(status=201, body=SUMMARY)
    with pytest.raises(FileNotFoundError, match="head.safetensors"):
        make_client(rec).register_head(head_folder, "x")
    assert rec.requests == []


def test_list_get_delete() -> None:
    rec = Recorder(body={"heads": [SUMMARY, {**SUMMARY, "name": "other", "resident": True}]})
    client = make_client(rec)
    heads = client.list_heads()
    assert rec.last.method == "GET" and rec.last.url.path == "/heads"
    assert [(h.name, h.resident) for h in heads] == [("math", False), ("other", True)]

    rec.body = SUMMARY
    assert client.get_head("math").prompt_template == "Problem: {problem}\nSolution:"
    assert rec.last.method == "GET" and rec.last.url.path == "/heads/math"

    rec.status, rec.body = 204, None
    client.delete_head("math")
    assert rec.last.method == "DELETE" and rec.last.url.path == "/heads/math"


def test_head_names_are_escaped_in_paths() -> None:
    rec = Recorder(status=404, body={"detail": "no"})
    with pytest.raises(HeadNotFoundError):
        make_client(rec).get_head("../generate")
    assert rec.last.url.raw_path == b"/heads/..%2Fgenerate"


def test_operations() -> None:
    rec = Recorder(body={"status": "ok"})
    client = make_client(rec)
    assert client.health() == {"status": "ok"} and rec.last.url.path == "/healthz"
    rec.body = {"status": "ready", "base": "models/mini-gpt2", "base_fingerprint": "f" * 64, "device": "cpu"}
    ready = client.ready()
    assert rec.last.url.path == "/readyz" and ready.status == "ready" and ready.device == "cpu"
    rec.body, rec.content = None, b"# TYPE x counter\nx 1\n"
    assert client.metrics_text() == "# TYPE x counter\nx 1\n" and rec.last.url.path == "/metrics"


# --- auth, URLs, timeouts -------------------------------------------------------------------------------------------

def test_token_is_sent_as_bearer(head_folder: Path) -> None:
    rec = Recorder(status=201, body=SUMMARY)
    client = make_client(rec, token="s3cret")
    client.register_head(head_folder, "x")
    assert rec.last.headers["authorization"] == "Bearer s3cret"
    rec.status, rec.body = 204, None
    client.delete_head("x")
    assert rec.last.headers["authorization"] == "Bearer s3cret"


def test_base_url_with_a_given_http_client() -> None:
    rec = Recorder(body={"status": "ok"})
    http = httpx.Client(transport=httpx.MockTransport(rec))
    HeadserveClient("http://elsewhere:9000/", http=http).health()
    assert str(rec.last.url) == "http://elsewhere:9000/healthz"


def test_own_client_defaults_and_lifecycle() -> None:
    with HeadserveClient() as client:
        own = cast(httpx.Client, client._http)
        assert client.base_url == "http://127.0.0.1:8000" and str(own.base_url) == "http://127.0.0.1:8000"
        assert own.timeout.read == 120.0 and own.timeout.connect == 5.0
    assert own.is_closed
    with HeadserveClient("http://h:1", timeout=3.0) as client:
        assert cast(httpx.Client, client._http).timeout.read == 3.0


def test_a_given_http_client_is_not_closed() -> None:
    http = httpx.Client(transport=httpx.MockTransport(Recorder()))
    with HeadserveClient(http=http):
        pass
    assert not http.is_closed


def test_explicit_timeout_is_passed_per_request() -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.extensions["timeout"])
        return httpx.Response(200, json={"status": "ok"})

    http = httpx.Client(transport=httpx.MockTransport(handler), base_url="http://headserve.test", timeout=50.0)
    HeadserveClient(http=http).health()
    HeadserveClient(http=http, timeout=2.5).health()
    assert seen[0]["read"] == 50.0 and seen[1]["read"] == 2.5


# --- errors ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("status", "cls"), [
    (401, UnauthorizedError), (403, ForbiddenError), (404, HeadNotFoundError), (409, ConflictError),
    (413, PayloadTooLargeError), (422, InvalidRequestError), (429, QueueFullError), (503, NotReadyError),
    (500, ServerError), (502, ServerError), (400, HeadserveError),
])
def test_status_maps_to_typed_error(status: int, cls: type[HeadserveError]) -> None:
    rec = Recorder(status=status, body={"detail": f"readable {status}"})
    with pytest.raises(cls) as info:
        make_client(rec).generate("p", "math")
    assert type(info.value) is cls and isinstance(info.value, HeadserveError)
    assert info.value.status_code == status and info.value.detail == f"readable {status}"
    assert f"readable {status}" in str(info.value)


def test_validation_detail_list_is_made_readable() -> None:
    detail = [{"loc": ["body", "decoding", "top_k"], "msg": "Input should be less than or equal to 1000",
               "type": "less_than_equal"}]
    with pytest.raises(InvalidRequestError) as info:
        make_client(Recorder(status=422, body={"detail": detail})).generate("p", top_k=5000)
    assert info.value.detail == "decoding.top_k: Input should be less than or equal to 1000"


def test_non_json_error_body() -> None:
    with pytest.raises(ServerError) as info:
        make_client(Recorder(status=502, content=b"Bad Gateway from proxy")).health()
    assert info.value.detail == "Bad Gateway from proxy" and info.value.status_code == 502


@pytest.mark.parametrize(("header", "expected"), [("7", 7.0), ("0.5", 0.5), (None, None), ("soon", None)])
def test_retry_after_seconds(header: str | None, expected: float | None) -> None:
    rec = Recorder(status=429, body={"detail": "queue full"}, headers={"Retry-After": header} if header else {})
    with pytest.raises(QueueFullError) as info:
        make_client(rec).generate("p")
    assert info.value.retry_after == expected and info.value.detail == "queue full"


def test_retry_after_http_date() -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    rec = Recorder(status=429, body={"detail": "queue full"}, headers={"Retry-After": when})
    with pytest.raises(QueueFullError) as info:
        make_client(rec).generate("p")
    assert info.value.retry_after is not None and 25 <= info.value.retry_after <= 31


def test_transport_failure_is_a_connection_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    client = HeadserveClient("http://nowhere.test", http=httpx.Client(transport=httpx.MockTransport(refuse)))
    with pytest.raises(HeadserveConnectionError, match="cannot reach http://nowhere.test") as info:
        client.health()
    assert info.value.status_code is None


# --- async ----------------------------------------------------------------------------------------------------------

def test_async_client_builds_the_same_requests(head_folder: Path) -> None:
    rec = Recorder(body=GENERATED)

    async def scenario() -> None:
        http = httpx.AsyncClient(transport=httpx.MockTransport(rec), base_url="http://headserve.test")
        async with AsyncHeadserveClient(http=http, token="t") as client:
            result = await client.generate("q", "math", seed=1, compare=True)
            assert result.comparisons is not None and len(result.comparisons) == 2
            assert sent_json(rec.last) == {"prompt": "q", "head": "math", "decoding": {"seed": 1}, "compare": True}
            assert rec.last.headers["authorization"] == "Bearer t"
            rec.status, rec.body = 201, SUMMARY
            await client.register_head(head_folder, "n", replace=True)
            assert set(multipart_parts(rec.last)) == {"name", "config", "weights"}
            rec.status, rec.body = 409, {"detail": "taken"}
            with pytest.raises(ConflictError, match="taken"):
                await client.register_head(head_folder, "n")
            rec.status, rec.body, rec.headers = 429, {"detail": "full"}, {"Retry-After": "3"}
            with pytest.raises(QueueFullError) as info:
                await client.generate("q")
            assert info.value.retry_after == 3.0
        assert not http.is_closed
        await http.aclose()

    asyncio.run(scenario())


def test_clients_import_none_of_the_server_side_packages() -> None:
    """DESIGN.md: clients/ talks HTTP only; it never imports server/, heads/ or training/ (nor torch)."""
    code = ("import sys, clients, clients.__main__; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'server', 'heads', 'training', 'torch'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.stdout.strip() == "[]"
