"""`HeadserveClient` over FastAPI's TestClient: the real app in process, lifespan included, on the tiny base."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import SecretStr

from clients import (
    ConflictError,
    ForbiddenError,
    GenerateResult,
    HeadNotFoundError,
    HeadserveClient,
    InvalidRequestError,
    NotReadyError,
    PayloadTooLargeError,
    QueueFullError,
    ServerError,
    StreamToken,
    UnauthorizedError,
)
from clients.streaming import event_from_line
from heads import BackwardAttentionConfig, BackwardAttentionHead, save_head
from heads.base import load_base
from server.app import create_app
from server.settings import Settings

TEMPLATE = "Problem: {problem}\nSolution:"
TOKEN = "inprocess-admin-token"


def make_head(base_dir: Path, out: Path, seed: int = 0, training: dict[str, object] | None = None) -> Path:
    base = load_base(str(base_dir))
    torch.manual_seed(seed)
    head = BackwardAttentionHead(BackwardAttentionConfig(latent_dim=16, num_heads=2), vocab_size=base.vocab_size,
                                 n_embd=base.n_embd)
    save_head(head, out, base.info(), task="math", prompt_template=TEMPLATE, training=training)
    return out


@pytest.fixture(scope="module")
def heads_dir(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    heads_dir = tmp_path_factory.mktemp("inprocess-heads")
    make_head(tiny_base_dir, heads_dir / "math")
    return heads_dir


@contextmanager
def serve(settings: Settings) -> Iterator[TestClient]:
    """The app in process with its lifespan running, returned once /readyz says the base is loaded."""
    with TestClient(create_app(settings)) as http:  # the context manager runs the lifespan (model load)
        deadline = time.monotonic() + 60
        while True:  # the base loads in the background
            try:
                HeadserveClient(http=http).ready()
                break
            except NotReadyError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield http


@pytest.fixture(scope="module")
def http(tiny_base_dir: Path, heads_dir: Path) -> Iterator[TestClient]:
    settings = Settings(base_model=str(tiny_base_dir), heads_dir=heads_dir, admin_token=SecretStr(TOKEN), device="cpu")
    with serve(settings) as h:
        yield h


@pytest.fixture
def client(http: TestClient) -> HeadserveClient:
    return HeadserveClient(http=http, token=TOKEN)


def test_ready_and_health(client: HeadserveClient, tiny_base_dir: Path) -> None:
    assert client.health() == {"status": "ok"}
    ready = client.ready()
    assert ready.status == "ready" and ready.device == "cpu"
    assert ready.base_fingerprint == load_base(str(tiny_base_dir)).fingerprint


def test_generate_with_the_base(client: HeadserveClient) -> None:
    result = client.generate("What is 12 + 7?", max_new_tokens=6, compare=True)
    assert result.head is None and result.prompt == "What is 12 + 7?"
    assert 1 <= result.tokens <= 6 and result.finish_reason in {"length", "eos", "stop"}
    assert result.logprobs is None and result.timings.total_s >= 0
    assert result.comparisons is not None
    assert [c.decoder for c in result.comparisons] == ["linear_greedy", "linear_top_k"]
    # Greedy (the default) with the base's own head *is* the linear greedy comparison.
    assert (result.comparisons[0].text, result.comparisons[0].tokens) == (result.text, result.tokens)


def test_generate_with_a_head(client: HeadserveClient) -> None:
    result = client.generate("What is 12 + 7?", "math", max_new_tokens=5, compare=["greedy"], return_logprobs=True)
    assert result.head == "math" and result.prompt == TEMPLATE.format(problem="What is 12 + 7?")
    assert result.comparisons is not None and [c.decoder for c in result.comparisons] == ["linear_greedy"]
    assert result.logprobs is not None and len(result.logprobs) == result.tokens
    assert all(lp.logprob <= 0.0 for lp in result.logprobs)
    raw = client.generate("What is 12 + 7?", "math", max_new_tokens=5, raw=True)
    assert raw.prompt == "What is 12 + 7?"


def test_same_seed_same_text(client: HeadserveClient) -> None:
    def sample(seed: int) -> str:
        return client.generate("Ava has 3 apples.", "math", max_new_tokens=8, strategy="top_k", top_k=50,
                               temperature=1.5, seed=seed).text
    assert sample(7) == sample(7)


@pytest.mark.parametrize("kwargs", [
    {"prompt": "   "}, {"max_new_tokens": 0}, {"max_new_tokens": 100_000}, {"top_k": 5000}, {"top_p": 0.0},
    {"temperature": 0.0}, {"seed": -1}, {"stop": ["x"] * 9}, {"head": "Not A Name!"},
])
def test_invalid_requests_are_422(client: HeadserveClient, kwargs: dict[str, object]) -> None:
    args = {"prompt": "2 + 2?", "max_new_tokens": 4, **kwargs}
    with pytest.raises(InvalidRequestError) as info:
        client.generate(**args)  # type: ignore[arg-type]
    assert info.value.status_code == 422 and info.value.detail


def test_unknown_head_is_404(client: HeadserveClient) -> None:
    with pytest.raises(HeadNotFoundError, match="nope"):
        client.generate("2 + 2?", "nope", max_new_tokens=2)
    with pytest.raises(HeadNotFoundError):
        client.get_head("nope")


def test_register_list_get_delete(client: HeadserveClient, tiny_base_dir: Path, heads_dir: Path,
                                  tmp_path: Path) -> None:
    training = {"steps": 3, "final_metrics": {"loss": 1.5}}
    folder = make_head(tiny_base_dir, tmp_path / "upload", seed=1, training=training)
    summary = client.register_head(folder, "uploaded")
    assert (summary.name, summary.type, summary.task, summary.prompt_template) == (
        "uploaded", "backward_attention", "math", TEMPLATE)
    assert summary.base_fingerprint == load_base(str(tiny_base_dir)).fingerprint and summary.bytes > 0
    assert summary.training["final_metrics"] == {"loss": 1.5} and summary.training["steps"] == 3
    assert (heads_dir / "uploaded" / "head.safetensors").read_bytes() == (folder / "head.safetensors").read_bytes()
    assert [h.name for h in client.list_heads()] == ["math", "uploaded"]
    assert client.get_head("uploaded").config["latent_dim"] == 16

    with pytest.raises(ConflictError):
        client.register_head(folder, "uploaded")
    assert client.register_head(folder, "uploaded", replace=True).name == "uploaded"
    assert client.generate("1 + 1?", "uploaded", max_new_tokens=3).head == "uploaded"

    client.delete_head("uploaded")
    assert not (heads_dir / "uploaded").exists()
    with pytest.raises(HeadNotFoundError):
        client.get_head("uploaded")
    with pytest.raises(HeadNotFoundError):
        client.delete_head("uploaded")


def test_admin_routes_need_the_token(http: TestClient, tiny_base_dir: Path, tmp_path: Path) -> None:
    folder = make_head(tiny_base_dir, tmp_path / "h")
    with pytest.raises(UnauthorizedError):
        HeadserveClient(http=http).register_head(folder, "nope")
    with pytest.raises(ForbiddenError):
        HeadserveClient(http=http, token="wrong").delete_head("math")
    assert [h.name for h in HeadserveClient(http=http).list_heads()] == ["math"]


def test_metrics_text(client: HeadserveClient) -> None:
    client.generate("2 + 2?", max_new_tokens=2)
    text = client.metrics_text()
    assert "# TYPE" in text


def test_queue_full_and_upload_too_large(tiny_base_dir: Path, tmp_path: Path) -> None:
    """A server with no queue room and a 1 KiB upload limit: 429 with Retry-After, and 413."""
    folder = make_head(tiny_base_dir, tmp_path / "big")
    settings = Settings(base_model=str(tiny_base_dir), heads_dir=tmp_path / "heads", device="cpu", max_queue=1,
                        max_upload_bytes=1024)
    with serve(settings) as limited:
        limited.app.state.runtime.engine.max_queue = 0  # type: ignore[attr-defined]  # MAX_QUEUE must be >= 1
        client = HeadserveClient(http=limited)
        with pytest.raises(QueueFullError) as info:
            client.generate("2 + 2?", max_new_tokens=2)
        assert info.value.status_code == 429 and info.value.retry_after is not None and info.value.retry_after > 0
        with pytest.raises(PayloadTooLargeError):
            client.register_head(folder, "big")
        assert client.list_heads() == []


def test_generate_stream_yields_tokens_then_the_result(client: HeadserveClient) -> None:
    events = list(client.generate_stream("What is 12 + 7?", "math", max_new_tokens=6, compare=True, seed=4))
    *tokens, result = events
    assert isinstance(result, GenerateResult) and all(isinstance(t, StreamToken) for t in tokens)
    same = client.generate("What is 12 + 7?", "math", max_new_tokens=6, compare=True, seed=4)
    assert result.text == same.text and result.comparisons is not None and same.comparisons is not None
    assert "".join(t.text for t in tokens if t.decoder == "main") == same.text
    for comparison in same.comparisons:
        assert "".join(t.text for t in tokens if t.decoder == comparison.decoder) == comparison.text
        assert comparison.timings is not None and comparison.timings.tokens_per_s > 0
    assert len([t for t in tokens if t.decoder == "main"]) == same.tokens


def test_generate_stream_errors_are_typed(client: HeadserveClient) -> None:
    with pytest.raises(HeadNotFoundError):
        list(client.generate_stream("2 + 2?", "nope"))
    with pytest.raises(InvalidRequestError):
        list(client.generate_stream("2 + 2?", max_new_tokens=0))


def test_stream_error_events_raise_the_typed_error() -> None:
    assert event_from_line("data: [DONE]") is None and event_from_line(": keep-alive") is None
    with pytest.raises(ServerError, match="internal server error"):
        event_from_line('data: {"type": "error", "status": 500, "detail": "internal server error"}')
    with pytest.raises(NotReadyError):
        event_from_line('data: {"type": "error", "status": 503, "detail": "shutting down"}')
    assert event_from_line('data: {"type": "from-the-future"}') is None
