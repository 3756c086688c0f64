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
    pid: int = 0  # the server process, for memory readings and kill -9

    def peak_rss_bytes(self) -> int:
        """The process's high-water resident memory (VmHWM): what a request cost at its worst."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM in /proc status")

    def client(self, token: str | None = "default") -> HeadserveClient:
        return HeadserveClient(self.url, token=self.token if token == "default" else token, timeout=60.0)


@contextmanager
def serve(base_dir: Path, heads_dir: Path, log: Path, token: str | None = None,
          env: dict[str, str] | None = None) -> Iterator[Server]:
    """`python -m server` on a free port until the block ends; its output goes to `log`; `env` adds HEADSERVE_*."""
    # One thread: OpenMP spinning on a busy 2-core machine slows a tiny model's steps many times over.
    env = {"OMP_NUM_THREADS": "1", **(env or {})}
    if token is not None:
        env["HEADSERVE_ADMIN_TOKEN"] = token
    with ServerProcess(base_dir, heads_dir, log, env=env, ready_timeout_s=READY_TIMEOUT_S,
                       log_level="info") as process:
        assert process.proc is not None
        yield Server(process.url, heads_dir, token, pid=process.proc.pid)
