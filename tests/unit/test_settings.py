"""Settings are checked at start-up: a bad value stops the server instead of failing requests later."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server import __main__ as cli
from server.settings import Settings, is_loopback


@pytest.mark.parametrize(("field", "value", "fragment"), [
    ("max_queue", 0, "greater than or equal to 1"),
    ("max_queue", -3, "greater than or equal to 1"),
    ("max_request_bytes", 10, "greater than or equal to 1024"),
    ("device", "gpu", "not a torch device"),
    ("device", "cuda:x", "not a torch device"),
    ("host", "  ", "host"),
    ("admin_token", "", "admin_token"),
    ("admin_token", " tok ", "whitespace"),
])
def test_bad_settings_are_refused_when_built(field: str, value: object, fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        Settings(**{"device": "cpu", field: value})


def test_bad_settings_from_the_environment_stop_the_cli(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli.uvicorn, "run", lambda *a, **k: pytest.fail("must not start"))
    monkeypatch.setenv("HEADSERVE_MAX_QUEUE", "0")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--port", "9101"])
    assert exit_info.value.code == 2
    assert "HEADSERVE_MAX_QUEUE" in capsys.readouterr().err


def test_good_settings_pass() -> None:
    s = Settings(device="cpu", max_queue=1, host=" 0.0.0.0 ", admin_token="tok")  # type: ignore[arg-type]
    assert s.max_queue == 1 and s.host == "0.0.0.0" and not s.listens_on_loopback


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("LOCALHOST", True), ("0.0.0.0", False), ("::", False), ("192.168.1.4", False), ("10.0.0.1", False),
    ("example.com", False), ("localhost.example.com", False), ("::ffff:127.0.0.1", False),
])
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
