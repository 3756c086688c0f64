"""The real server process on a free port, shared by the end-to-end tests (on the benchmark's launcher)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.server_proc import ServerProcess
from clients import HeadserveClient

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 60.0


@dataclass
class Server:
    url: str
    heads_dir: Path
    token: str | None = None

    def client(self, token: str | None = "default") -> HeadserveClient:
        return HeadserveClient(self.url, token=self.token if token == "default" else token, timeout=60.0)


@contextmanager
def serve(base_dir: Path, heads_dir: Path, log: Path, token: str | None = None) -> Iterator[Server]:
    """`python -m server` on a free port until the block ends; its output goes to `log`."""
    # One thread: OpenMP spinning on a busy 2-core machine slows a tiny model's steps many times over.
    env = {"OMP_NUM_THREADS": "1"}
    if token is not None:
        env["HEADSERVE_ADMIN_TOKEN"] = token
    with ServerProcess(base_dir, heads_dir, log, env=env, ready_timeout_s=READY_TIMEOUT_S,
                       log_level="info") as process:
        yield Server(process.url, heads_dir, token)
