"""The real server process on a free port, driven through the project's own client and CLI."""

from __future__ import annotations

import asyncio
import os
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from clients import (
    AsyncHeadserveClient,
    ConflictError,
    GenerateResult,
    HeadNotFoundError,
    HeadserveClient,
    HeadserveError,
    InvalidRequestError,
    StreamToken,
    UnauthorizedError,
)
from heads import BackwardAttentionConfig, BackwardAttentionHead, save_head
from heads.base import load_base
from tests.e2e.serving import Server, serve

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = "Problem: {problem}\nSolution:"
TOKEN = "e2e-admin-token"


def make_head(base_dir: Path, out: Path, seed: int = 0) -> Path:
    base = load_base(str(base_dir))
    torch.manual_seed(seed)
    head = BackwardAttentionHead(BackwardAttentionConfig(latent_dim=16, num_heads=2), vocab_size=base.vocab_size,
                                 n_embd=base.n_embd)
    save_head(head, out, base.info(), task="math", prompt_template=TEMPLATE)
    return out


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file and folder under `folder` (hidden temporaries included) by relative path; files with their bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def server(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("e2e")
    make_head(tiny_base_dir, root / "heads" / "math")
    with serve(tiny_base_dir, root / "heads", root / "server.log", token=TOKEN) as running:
        yield running


def test_ready_reports_the_base(server: Server, tiny_base_dir: Path) -> None:
    with server.client() as client:
        assert client.health() == {"status": "ok"}
        ready = client.ready()
    assert ready.status == "ready" and ready.base_fingerprint == load_base(str(tiny_base_dir)).fingerprint


def test_generate_with_base_and_head(server: Server) -> None:
    with server.client() as client:
        base = client.generate("What is 12 + 7?", max_new_tokens=8)
        assert base.head is None and base.comparisons is None and 1 <= base.tokens <= 8
        result = client.generate("What is 12 + 7?", "math", max_new_tokens=8, compare=True)
    assert result.head == "math" and result.prompt == TEMPLATE.format(problem="What is 12 + 7?")
    assert 1 <= result.tokens <= 8 and result.finish_reason in {"length", "eos", "stop"}
    assert result.comparisons is not None and len(result.comparisons) == 2
    assert [c.decoder for c in result.comparisons] == ["linear_greedy", "linear_top_k"]
    assert all(1 <= c.tokens <= 8 for c in result.comparisons)


def test_register_over_http_then_generate(server: Server, tiny_base_dir: Path, tmp_path: Path) -> None:
    folder = make_head(tiny_base_dir, tmp_path / "up", seed=2)
    with server.client() as client:
        with pytest.raises(UnauthorizedError):
            server.client(token=None).register_head(folder, "uploaded")
        summary = client.register_head(folder, "uploaded")
        assert summary.name == "uploaded" and summary.task == "math"
        assert "uploaded" in [h.name for h in client.list_heads()]
        assert (server.heads_dir / "uploaded" / "head.safetensors").read_bytes() == \
            (folder / "head.safetensors").read_bytes()
        result = client.generate("1 + 2?", "uploaded", max_new_tokens=4)
        assert result.head == "uploaded" and result.tokens >= 1
        client.delete_head("uploaded")


def test_head_copied_by_hand_appears(server: Server, tiny_base_dir: Path) -> None:
    make_head(tiny_base_dir, server.heads_dir / "byhand", seed=3)
    with server.client() as client:
        assert "byhand" in [h.name for h in client.list_heads()]
        assert client.generate("3 + 4?", "byhand", max_new_tokens=2).head == "byhand"
        client.delete_head("byhand")


def delete_during_request(client: HeadserveClient, url: str) -> tuple[GenerateResult | BaseException, bool]:
    """Start a long request with head "doomed", delete the head once the request is generating.

    Returns the request's outcome and whether the server provably still generated after the
    delete returned: the job was accepted after `sent`, so it finished after `sent + total_s`.
    """
    outcome: list[GenerateResult | BaseException] = []

    def long_request() -> None:
        try:
            with HeadserveClient(url, timeout=60.0) as c:
                outcome.append(c.generate("1 + 1 =", "doomed", max_new_tokens=200, raw=True, compare=True))
        except BaseException as e:  # handed to the main thread's assertions
            outcome.append(e)

    worker = threading.Thread(target=long_request)
    sent = time.monotonic()
    worker.start()
    deadline = sent + 10
    while not client.get_head("doomed").resident and time.monotonic() < deadline:  # resident: the job started
        time.sleep(0.005)
    client.delete_head("doomed")
    deleted = time.monotonic()
    worker.join(timeout=60)
    assert not worker.is_alive(), "the long request did not come back"
    [result] = outcome
    overlapped = isinstance(result, GenerateResult) and sent + result.timings.total_s > deleted
    return result, overlapped


def test_delete_while_a_request_is_in_flight(server: Server, tiny_base_dir: Path, tmp_path: Path) -> None:
    folder = make_head(tiny_base_dir, tmp_path / "doomed", seed=1)
    with server.client() as client:
        # On a fast machine the request may end before the delete lands; that proves nothing, so try again.
        for _ in range(5):
            client.register_head(folder, "doomed")
            result, overlapped = delete_during_request(client, server.url)
            assert isinstance(result, GenerateResult), result  # 200 despite the delete
            assert result.head == "doomed" and result.tokens >= 1 and result.comparisons is not None
            if overlapped:
                break
        assert overlapped, "the request never outlived the delete; the test proves nothing"
        with pytest.raises(HeadNotFoundError):
            client.get_head("doomed")
        with pytest.raises(HeadNotFoundError):
            client.generate("1 + 1 =", "doomed", max_new_tokens=2)
    assert not (server.heads_dir / "doomed").exists()


def _pickle(folder: Path, base_dir: Path) -> None:
    tensors = load_file(folder / "head.safetensors")
    (folder / "head.safetensors").write_bytes(pickle.dumps({k: v.numpy() for k, v in tensors.items()}))


def _truncated(folder: Path, base_dir: Path) -> None:
    data = (folder / "head.safetensors").read_bytes()
    (folder / "head.safetensors").write_bytes(data[: len(data) // 2])


def _nan(folder: Path, base_dir: Path) -> None:
    tensors = load_file(folder / "head.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, folder / "head.safetensors")


def _other_base(folder: Path, base_dir: Path) -> None:
    make_head(base_dir, folder)


@pytest.mark.parametrize(("corrupt", "error"), [
    (_pickle, InvalidRequestError), (_truncated, InvalidRequestError), (_nan, InvalidRequestError),
    (_other_base, ConflictError),
], ids=["pickle", "truncated", "nan", "other-base"])
def test_bad_uploads_are_refused(server: Server, tiny_base_dir: Path, other_base_dir: Path, tmp_path: Path,
                                 corrupt: Callable[[Path, Path], None], error: type[HeadserveError]) -> None:
    folder = make_head(tiny_base_dir, tmp_path / "bad", seed=4)
    corrupt(folder, other_base_dir)
    before = snapshot(server.heads_dir)
    with server.client() as client, pytest.raises(error) as info:
        client.register_head(folder, "bad")
    assert type(info.value) is error and info.value.detail
    assert "Traceback" not in info.value.detail
    assert snapshot(server.heads_dir) == before
    with server.client() as client, pytest.raises(HeadNotFoundError):
        client.get_head("bad")


def test_other_base_error_names_both_fingerprints(server: Server, tiny_base_dir: Path, other_base_dir: Path,
                                                   tmp_path: Path) -> None:
    folder = make_head(other_base_dir, tmp_path / "other")
    with server.client() as client, pytest.raises(ConflictError) as info:
        client.register_head(folder, "other")
    for base_dir in (tiny_base_dir, other_base_dir):
        assert load_base(str(base_dir)).fingerprint in info.value.detail


def run_cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADSERVE_")}
    return subprocess.run([sys.executable, "-m", "clients", *args, "--url", server.url], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_generate(server: Server) -> None:
    with server.client() as client:
        expected = client.generate("What is 12 + 7?", "math", max_new_tokens=8)
    done = run_cli(server, "generate", "--head", "math", "What is 12 + 7?", "--max-new-tokens", "8")
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected.text + "\n"  # greedy by default: the same text every time

    done = run_cli(server, "generate", "--head", "math", "What is 12 + 7?", "--max-new-tokens", "8", "--compare")
    assert done.returncode == 0, done.stderr
    for piece in ("head: math", "linear_greedy", "linear_top_k", "timings:"):
        assert piece in done.stdout

    done = run_cli(server, "generate", "--head", "math", "What is 12 + 7?", "--max-new-tokens", "8", "--stream")
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected.text + "\n"  # the streamed pieces spell the same answer

    done = run_cli(server, "heads")
    assert done.returncode == 0 and done.stdout.split()[:7] == ["NAME", "STATUS", "TYPE", "TASK", "BYTES", "RESIDENT",
                                                         "CREATED"]
    assert "math" in done.stdout


def test_cli_errors_are_one_line(server: Server) -> None:
    done = run_cli(server, "generate", "--head", "nope", "2 + 2?")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and "(HTTP 404)" in done.stderr
    done = run_cli(server, "delete", "math")  # no token in the environment: refused, and math survives
    assert done.returncode == 1 and "(HTTP 401)" in done.stderr and "Traceback" not in done.stderr
    assert (server.heads_dir / "math").is_dir()


def test_async_client_round_trip(server: Server, tiny_base_dir: Path, tmp_path: Path) -> None:
    folder = make_head(tiny_base_dir, tmp_path / "async-head", seed=5)

    async def scenario() -> tuple[GenerateResult, GenerateResult, list[str]]:
        async with AsyncHeadserveClient(server.url, token=TOKEN, timeout=60.0) as client:
            await client.ready()
            await client.register_head(folder, "async-head")
            first, second = await asyncio.gather(
                client.generate("5 + 6?", "async-head", max_new_tokens=6),
                client.generate("5 + 6?", max_new_tokens=6, compare=True))
            names = [h.name for h in await client.list_heads()]
            await client.delete_head("async-head")
            with pytest.raises(HeadNotFoundError):
                await client.get_head("async-head")
            return first, second, names

    first, second, names = asyncio.run(scenario())
    assert first.head == "async-head" and second.head is None and second.comparisons is not None
    assert "async-head" in names
    with server.client() as client:
        sync = client.generate("5 + 6?", max_new_tokens=6)
    assert sync.text == second.text  # greedy: the concurrent request decoded exactly as a lone one


def test_async_generate_stream(server: Server) -> None:
    async def scenario() -> list[StreamToken | GenerateResult]:
        async with AsyncHeadserveClient(server.url, timeout=60.0) as client:
            with pytest.raises(HeadNotFoundError):
                async for _ in client.generate_stream("5 + 6?", "nope"):
                    pass
            return [event async for event in client.generate_stream("5 + 6?", "math", max_new_tokens=6,
                                                                     compare=["greedy"])]

    *tokens, result = asyncio.run(scenario())
    assert isinstance(result, GenerateResult) and all(isinstance(t, StreamToken) for t in tokens)
    assert "".join(t.text for t in tokens if isinstance(t, StreamToken) and t.decoder == "main") == result.text
    assert result.comparisons is not None
    assert "".join(t.text for t in tokens if isinstance(t, StreamToken) and t.decoder == "linear_greedy") == \
        result.comparisons[0].text
