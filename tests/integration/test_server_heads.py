"""The heads API: uploads are validated before they become visible, and a rejected one changes nothing."""

from __future__ import annotations

import json
import pickle
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save as save_safetensors

from heads import CONFIG_NAME, WEIGHTS_NAME, BackwardAttentionConfig, BackwardAttentionHead, LinearHead, save_head
from heads.base import Base, load_base
from server.app import create_app
from server.settings import Settings
from tests.integration.ready import wait_ready

TEMPLATE = "Problem: {problem}\nSolution:"
TRAINING = {"steps": 10, "seed": 0, "final_metrics": {"val_loss": 1.5, "exact_match": 0.25}}


@pytest.fixture(scope="module")
def base(tiny_base_dir: Path) -> Base:
    return load_base(str(tiny_base_dir))


@pytest.fixture(scope="module")
def other_base(other_base_dir: Path) -> Base:
    return load_base(str(other_base_dir))


def write_head(base: Base, out: Path, seed: int = 0, kind: str = "backward_attention") -> Path:
    torch.manual_seed(seed)
    if kind == "linear":
        head: torch.nn.Module = LinearHead(vocab_size=base.vocab_size, n_embd=base.n_embd)
    else:
        head = BackwardAttentionHead(BackwardAttentionConfig(latent_dim=8, residual=False),
                                     vocab_size=base.vocab_size, n_embd=base.n_embd)
    save_head(head, out, base.info(), task="math", prompt_template=TEMPLATE, training=TRAINING)
    return out


def head_files(base: Base, tmp_path: Path, seed: int = 0) -> tuple[bytes, bytes]:
    folder = write_head(base, tmp_path / f"src-{seed}-{base.fingerprint[-6:]}", seed)
    return (folder / CONFIG_NAME).read_bytes(), (folder / WEIGHTS_NAME).read_bytes()


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under the registry with the bytes of every file: equal snapshots, identical trees."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture
def heads_dir(tmp_path: Path) -> Path:
    root = tmp_path / "registry"
    root.mkdir()
    return root


@pytest.fixture
def make_client(tiny_base_dir: Path, heads_dir: Path) -> Iterator[Callable[..., TestClient]]:
    opened: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        settings = Settings(base_model=str(tiny_base_dir), heads_dir=heads_dir, device="cpu", max_new_tokens=8,
                            **overrides)
        c = TestClient(create_app(settings))
        c.__enter__()
        opened.append(c)
        wait_ready(c)
        return c

    yield make
    for c in opened:
        c.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


def upload(client: TestClient, name: str, config: bytes, weights: bytes, replace: bool | None = None,
           token: str | None = None) -> Any:
    params = {"replace": "true"} if replace else {}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return client.post("/heads", data={"name": name}, params=params, headers=headers,
                       files={"config": ("head_config.json", config), "weights": ("head.safetensors", weights)})


def test_register_then_list_describe_and_use(client: TestClient, base: Base, heads_dir: Path,
                                             tmp_path: Path) -> None:
    config, weights = head_files(base, tmp_path)
    r = upload(client, "math-v1", config, weights)
    assert r.status_code == 201, r.text
    summary = r.json()
    assert summary["name"] == "math-v1" and summary["type"] == "backward_attention" and summary["task"] == "math"
    assert summary["bytes"] == len(config) + len(weights)
    assert summary["resident"] is False
    assert summary["prompt_template"] == TEMPLATE and summary["base_fingerprint"] == base.fingerprint
    assert summary["training"]["final_metrics"] == {"val_loss": 1.5, "exact_match": 0.25}
    assert summary["config"]["latent_dim"] == 8 and summary["created_at"]
    assert (heads_dir / "math-v1" / WEIGHTS_NAME).read_bytes() == weights
    assert sorted(p.name for p in heads_dir.iterdir()) == ["math-v1"]  # no temporary folder left behind

    assert client.get("/heads/math-v1").json() == summary
    out = client.post("/generate", json={"prompt": "2 + 2?", "head": "math-v1", "max_new_tokens": 3})
    assert out.status_code == 200 and out.json()["prompt"] == "Problem: 2 + 2?\nSolution:"
    listed = client.get("/heads").json()["heads"]
    assert [h["name"] for h in listed] == ["math-v1"] and listed[0]["resident"] is True


def test_name_taken_is_409_and_replace_overwrites(client: TestClient, base: Base, heads_dir: Path,
                                                  tmp_path: Path) -> None:
    config, weights = head_files(base, tmp_path, seed=0)
    assert upload(client, "math", config, weights).status_code == 201
    new_config, new_weights = head_files(base, tmp_path, seed=1)
    assert new_weights != weights
    before = snapshot(heads_dir)
    r = upload(client, "math", new_config, new_weights)
    assert r.status_code == 409 and "already exists" in r.json()["detail"]
    assert snapshot(heads_dir) == before
    r = upload(client, "math", new_config, new_weights, replace=True)
    assert r.status_code == 201
    assert (heads_dir / "math" / WEIGHTS_NAME).read_bytes() == new_weights
    assert sorted(p.name for p in heads_dir.iterdir()) == ["math"]


def test_head_for_another_base_is_409_naming_both_fingerprints(client: TestClient, base: Base, other_base: Base,
                                                               heads_dir: Path, tmp_path: Path) -> None:
    config, weights = head_files(other_base, tmp_path)
    before = snapshot(heads_dir)
    r = upload(client, "other", config, weights)
    assert r.status_code == 409
    detail = r.json()["detail"]
    assert base.fingerprint in detail and other_base.fingerprint in detail
    assert snapshot(heads_dir) == before == {}


def _nan_weights(base: Base, tmp_path: Path) -> tuple[bytes, bytes]:
    head = LinearHead(vocab_size=base.vocab_size, n_embd=base.n_embd)
    bad = write_head(base, tmp_path / "nan", kind="linear")
    tensors = {k: v.clone() for k, v in head.state_dict().items()}
    tensors["proj.weight"][3, 4] = float("nan")
    return (bad / CONFIG_NAME).read_bytes(), save_safetensors(tensors)


def _pickle_weights(base: Base, tmp_path: Path) -> tuple[bytes, bytes]:
    return head_files(base, tmp_path)[0], pickle.dumps({"proj.weight": [[0.0] * 4]})


def _truncated_weights(base: Base, tmp_path: Path) -> tuple[bytes, bytes]:
    config, weights = head_files(base, tmp_path)
    return config, weights[: len(weights) // 2]


def _garbage_config(base: Base, tmp_path: Path) -> tuple[bytes, bytes]:
    return b"{not json", head_files(base, tmp_path)[1]


def _unknown_kind(base: Base, tmp_path: Path) -> tuple[bytes, bytes]:
    config, weights = head_files(base, tmp_path)
    return json.dumps({**json.loads(config), "head_type": "mlp"}).encode(), weights


# case -> (make the files, what the detail must say)
BAD_UPLOADS: dict[str, tuple[Callable[[Base, Path], tuple[bytes, bytes]], str]] = {
    "pickle weights": (_pickle_weights, "not a valid safetensors file"),
    "truncated safetensors": (_truncated_weights, "not a valid safetensors file"),
    "nan weights": (_nan_weights, "NaN"),
    "garbage json config": (_garbage_config, "not valid JSON"),
    "unknown head kind": (_unknown_kind, "unknown head_type 'mlp'"),
}


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_bad_files_are_422_and_leave_the_registry_untouched(client: TestClient, base: Base, heads_dir: Path,
                                                            tmp_path: Path, case: str) -> None:
    write_head(base, heads_dir / "existing")
    make_files, expected = BAD_UPLOADS[case]
    config, weights = make_files(base, tmp_path)
    before = snapshot(heads_dir)
    for replace in (False, True):
        name = "existing" if replace else "fresh"
        r = upload(client, name, config, weights, replace=replace)
        assert r.status_code == 422, r.text
        assert expected in r.json()["detail"] and "Traceback" not in r.text
        assert snapshot(heads_dir) == before


@pytest.mark.parametrize("name", ["Math", "../evil", ".hidden", "-dash", "a" * 65, "a/b", "spa ce", ""])
def test_bad_names_are_422(client: TestClient, base: Base, heads_dir: Path, tmp_path: Path, name: str) -> None:
    config, weights = head_files(base, tmp_path)
    r = upload(client, name, config, weights)
    assert r.status_code == 422 and isinstance(r.json()["detail"], str)
    assert snapshot(heads_dir) == {}
    assert not (tmp_path / "evil").exists()


def test_bad_name_in_path_is_422(client: TestClient) -> None:
    assert client.get("/heads/Math").status_code == 422
    assert client.get("/heads/..%2Fetc").status_code in (404, 422)


def test_missing_parts_and_non_multipart_bodies_are_422(client: TestClient, base: Base, tmp_path: Path) -> None:
    config, _ = head_files(base, tmp_path)
    r = client.post("/heads", data={"name": "x"}, files={"config": ("c.json", config)})
    assert r.status_code == 422 and "weights" in r.json()["detail"]
    r = client.post("/heads", json={"name": "x"})
    assert r.status_code == 422 and "multipart" in r.json()["detail"]


def test_upload_over_the_limit_is_413(make_client: Callable[..., TestClient], base: Base, heads_dir: Path,
                                      tmp_path: Path) -> None:
    client = make_client(max_upload_bytes=2000)
    config, weights = head_files(base, tmp_path)
    assert len(config) + len(weights) > 2000
    r = upload(client, "big", config, weights)
    assert r.status_code == 413 and "2000" in r.json()["detail"]
    # Without a Content-Length the limit is enforced while the body streams in.
    boundary = "testboundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nbig\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="weights"; filename="w"\r\n\r\n').encode()
    body += weights + f"\r\n--{boundary}--\r\n".encode()
    r = client.post("/heads", content=iter([body[:1000], body[1000:]]),
                    headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413
    assert snapshot(heads_dir) == {}


def test_delete_then_404(client: TestClient, base: Base, heads_dir: Path) -> None:
    write_head(base, heads_dir / "gone")
    assert client.post("/generate", json={"prompt": "x", "head": "gone", "max_new_tokens": 2}).status_code == 200
    r = client.delete("/heads/gone")
    assert r.status_code == 204 and r.content == b""
    assert not (heads_dir / "gone").exists()
    assert client.get("/heads/gone").status_code == 404
    assert client.delete("/heads/gone").status_code == 404
    assert client.post("/generate", json={"prompt": "x", "head": "gone"}).status_code == 404
    assert client.get("/heads").json() == {"heads": []}


def test_admin_token_guards_register_and_delete(make_client: Callable[..., TestClient], base: Base, heads_dir: Path,
                                                tmp_path: Path) -> None:
    client = make_client(admin_token="s3cret")
    config, weights = head_files(base, tmp_path)
    r = upload(client, "math", config, weights)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert upload(client, "math", config, weights, token="wrong").status_code == 403
    assert snapshot(heads_dir) == {}
    assert upload(client, "math", config, weights, token="s3cret").status_code == 201
    assert client.get("/heads/math").status_code == 200  # reading needs no token
    assert client.delete("/heads/math").status_code == 401
    assert client.delete("/heads/math", headers={"Authorization": "Bearer nope"}).status_code == 403
    assert client.delete("/heads/math", headers={"Authorization": "Bearer s3cret"}).status_code == 204


def test_heads_copied_by_hand_appear_without_restart(client: TestClient, base: Base, other_base: Base,
                                                     heads_dir: Path, tmp_path: Path) -> None:
    assert client.get("/heads").json() == {"heads": []}
    shutil.copytree(write_head(base, tmp_path / "made-elsewhere"), heads_dir / "by-hand")
    (heads_dir / ".by-hand.tmp-1234").mkdir()  # an unfinished write: hidden, never listed
    (heads_dir / "broken").mkdir()
    (heads_dir / "broken" / CONFIG_NAME).write_text("{oops")
    write_head(other_base, heads_dir / "foreign")
    listed = {h["name"]: h for h in client.get("/heads").json()["heads"]}
    assert list(listed) == ["broken", "by-hand", "foreign"]  # sorted; the temporary folder is not a head
    assert listed["by-hand"]["status"] == "ready" and listed["by-hand"]["error"] is None
    assert listed["broken"]["status"] == "invalid" and "not valid JSON" in listed["broken"]["error"]
    assert listed["broken"]["type"] is None and listed["broken"]["config"] is None
    # A sound head for another base is not a fault: listed incompatible, with both fingerprints.
    foreign = listed["foreign"]
    assert foreign["status"] == "incompatible" and base.fingerprint in foreign["error"]
    assert foreign["base_fingerprint"] == other_base.fingerprint != base.fingerprint
    assert foreign["served_base_fingerprint"] == base.fingerprint
    assert listed["by-hand"]["served_base_fingerprint"] is None
    assert foreign["type"] == "backward_attention"  # its config is fine: only the base differs
    r = client.post("/generate", json={"prompt": "1 + 1", "head": "by-hand", "max_new_tokens": 2})
    assert r.status_code == 200 and r.json()["tokens"] == 2
    r = client.post("/generate", json={"prompt": "1 + 1", "head": "foreign", "max_new_tokens": 2})
    assert r.status_code == 409 and base.fingerprint in r.json()["detail"]
    r = client.post("/generate", json={"prompt": "1 + 1", "head": "broken"})
    assert r.status_code == 409 and str(heads_dir) not in r.json()["detail"]


def test_heads_of_another_base_are_listed_incompatible_without_warnings(client: TestClient, base: Base,
                                                                        other_base: Base, heads_dir: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A registry shared by servers of different bases: the other base's heads are a normal sight."""
    write_head(other_base, heads_dir / "theirs")
    broken = write_head(base, heads_dir / "broken")
    (broken / WEIGHTS_NAME).unlink()
    with caplog.at_level("INFO", logger="server.registry"):
        listed = {h["name"]: h["status"] for h in client.get("/heads").json()["heads"]}
    assert listed == {"theirs": "incompatible", "broken": "invalid"}
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("'broken'" in m for m in warned) and not any("'theirs'" in m for m in warned)
    r = client.post("/generate", json={"prompt": "1 + 1", "head": "theirs"})
    assert r.status_code == 409 and other_base.fingerprint in r.json()["detail"]


def test_base_is_not_a_head_name(client: TestClient, base: Base, heads_dir: Path, tmp_path: Path) -> None:
    """`base` names the base's own head in /v1 `model` and the metrics: a head of that name would be unreachable."""
    config, weights = head_files(base, tmp_path)
    r = upload(client, "base", config, weights)
    assert r.status_code == 422 and "base" in r.json()["detail"]
    shutil.copytree(write_head(base, tmp_path / "dropped"), heads_dir / "base")
    assert client.get("/heads").json() == {"heads": []}


def test_a_request_in_flight_finishes_when_its_head_is_deleted(client: TestClient, base: Base,
                                                               heads_dir: Path) -> None:
    write_head(base, heads_dir / "doomed")
    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    stepping, release = threading.Event(), threading.Event()
    original = runtime.engine.model.step

    def slow_step(cache: Any, decode_ids: list[int], *args: Any) -> Any:
        if decode_ids:  # a decode step: the head is already in use
            stepping.set()
            release.wait(10)
        return original(cache, decode_ids, *args)

    runtime.engine.model.step = slow_step
    result: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: result.update(r=client.post(
        "/generate", json={"prompt": "x", "head": "doomed", "max_new_tokens": 4})))
    try:
        worker.start()
        assert stepping.wait(10)
        assert client.delete("/heads/doomed").status_code == 204
        assert "doomed" not in runtime.head_cache.resident()
    finally:
        release.set()
        worker.join(10)
        runtime.engine.model.step = original
    assert result["r"].status_code == 200 and result["r"].json()["tokens"] == 4
