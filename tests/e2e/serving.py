"""The real server process on a free port, shared by the end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from clients import HeadserveClient, HeadserveError

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 60.0


@dataclass
class Server:
    url: str
    heads_dir: Path
    token: str | None = None

    def client(self, token: str | None = "default") -> HeadserveClient:
        return HeadserveClient(self.url, token=self.token if token == "default" else token, timeout=60.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    with HeadserveClient(url, timeout=2.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"server exited with {process.returncode} before ready:\n{log.read_text()[-3000:]}")
            try:
                client.ready()
                return
            except HeadserveError:  # NotReadyError, or not listening yet
                time.sleep(0.25)
    pytest.fail(f"server not ready after {READY_TIMEOUT_S:.0f} s:\n{log.read_text()[-3000:]}")


@contextmanager
def serve(base_dir: Path, heads_dir: Path, log: Path, token: str | None = None) -> Iterator[Server]:
    """`python -m server` on a free port until the block ends; its output goes to `log`."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADSERVE_")}
    # One thread: OpenMP spinning on a busy 2-core machine slows a tiny model's steps many times over.
    env.update(OMP_NUM_THREADS="1")
    if token is not None:
        env["HEADSERVE_ADMIN_TOKEN"] = token
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port),
             "--base-model", str(base_dir), "--heads-dir", str(heads_dir)],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, process, log)
        yield Server(url, heads_dir, token)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
