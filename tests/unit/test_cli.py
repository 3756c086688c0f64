"""`python -m clients` against a mock server (the real one is driven in tests/e2e)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from clients.__main__ import main
from tests.unit.client_fakes import GENERATED, SUMMARY, Recorder, sent_json


@pytest.fixture
def cli_transport(monkeypatch: pytest.MonkeyPatch) -> Callable[[Recorder], None]:
    """Route the CLI's own httpx.Client through a recorder."""
    def install(rec: Recorder) -> None:
        real = httpx.Client

        def fake_client(**kwargs: Any) -> httpx.Client:
            return real(transport=httpx.MockTransport(rec), **kwargs)

        monkeypatch.setattr("clients.client.httpx.Client", fake_client)
    return install


def test_cli_generate_compare(cli_transport: Callable[[Recorder], None], capsys: pytest.CaptureFixture[str]) -> None:
    rec = Recorder(body=GENERATED)
    cli_transport(rec)
    assert main(["generate", "--head", "math", "What is 12 + 7?", "--compare", "--seed", "4",
                 "--url", "http://cli.test:1234"]) == 0
    assert str(rec.last.url) == "http://cli.test:1234/generate"
    assert sent_json(rec.last) == {"prompt": "What is 12 + 7?", "head": "math", "decoding": {"seed": 4},
                                   "compare": True}
    out = capsys.readouterr().out
    for piece in ("head: math", "linear_greedy", "linear_top_k", "eos, 7 tokens", "length, 4 tokens", "19.",
                  "20 and more", "total 0.200 s"):
        assert piece in out


def test_cli_generate_json_and_plain(cli_transport: Callable[[Recorder], None],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    cli_transport(Recorder(body=GENERATED))
    assert main(["generate", "p", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == GENERATED
    assert main(["generate", "p"]) == 0
    assert capsys.readouterr().out == " 12 + 7 = 19.\n"


def test_cli_heads_register_delete(cli_transport: Callable[[Recorder], None], head_folder: Path,
                                   capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADSERVE_ADMIN_TOKEN", "from-env")
    broken = {"name": "broken", "status": "invalid", "error": "head_config.json: 'config' must be an object",
              "bytes": 10, "resident": False}
    rec = Recorder(body={"heads": [SUMMARY, broken]})
    cli_transport(rec)
    assert main(["heads"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "STATUS", "TYPE", "TASK", "BYTES", "RESIDENT", "CREATED"]
    assert lines[1].split() == ["math", "ready", "backward_attention", "math", "1234", "no",
                                "2024-01-01T00:00:00+00:00"]
    assert lines[2].split() == ["broken", "invalid", "-", "-", "10", "no", "-"]
    assert lines[-1] == "broken: head_config.json: 'config' must be an object"

    rec.status, rec.body = 201, SUMMARY
    assert main(["register", str(head_folder), "--name", "math", "--replace"]) == 0
    assert rec.last.headers["authorization"] == "Bearer from-env" and rec.last.url.params["replace"] == "true"
    assert "registered math" in capsys.readouterr().out

    rec.status, rec.body = 204, None
    assert main(["--token", "flag", "delete", "math"]) == 0
    assert rec.last.headers["authorization"] == "Bearer flag" and rec.last.method == "DELETE"


def test_cli_errors_are_one_line(cli_transport: Callable[[Recorder], None],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    cli_transport(Recorder(status=404, body={"detail": "unknown head 'nope'\n(see GET /heads)"}))
    assert main(["generate", "--head", "nope", "p"]) == 1
    err = capsys.readouterr().err
    assert err == "error: unknown head 'nope' (see GET /heads) (HTTP 404)\n"
    assert main(["register", "/does/not/exist"]) == 1
    assert capsys.readouterr().err.startswith("error: /does/not/exist/head_config.json: missing")


def test_cli_url_from_environment(cli_transport: Callable[[Recorder], None], monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HEADSERVE_URL", "http://env.test:4321")
    monkeypatch.delenv("HEADSERVE_ADMIN_TOKEN", raising=False)
    rec = Recorder(body={"heads": []})
    cli_transport(rec)
    assert main(["heads"]) == 0
    assert str(rec.last.url) == "http://env.test:4321/heads" and "authorization" not in rec.last.headers
    assert capsys.readouterr().out == "no heads\n"
