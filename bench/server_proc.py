"""Run the real server (`python -m server`) as a child process for the benchmark.

Why a subprocess rather than the app in-process: the numbers should include HTTP, JSON and the
event loop exactly as a deployment pays them, and the server must not share a Python interpreter
(and its GIL) with the load generator.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from clients import HeadserveClient, HeadserveError

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A port nobody is listening on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_Child = TypeVar("_Child", bound="ChildServer")


class ChildServer:
    """A server child process (ours, or the vLLM peer): waited for until ready, always stopped on the way out.

    Subclasses say how to start and stop it and what "ready" means; the readiness loop, the log tail in
    every error and the context manager are written once here.
    """

    label = "the server"  # how errors name it
    poll_s = 0.5  # between readiness probes
    tail_lines = 20  # of its log in an error

    def __init__(self, log_path: Path, ready_timeout_s: float) -> None:
        self.log_path, self.ready_timeout_s = log_path, ready_timeout_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_after_s: float | None = None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def wait_ready(self, is_ready: Callable[[], bool]) -> None:
        """Poll `is_ready` until it says so; fail with the log's tail if the process exits or time runs out."""
        start = time.perf_counter()
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited with code {self.proc.returncode} before it was ready; "
                                   f"see {self.log_path}:\n{self.log_tail()}")
            if is_ready():
                self.ready_after_s = time.perf_counter() - start
                return
            if time.perf_counter() - start > self.ready_timeout_s:
                raise TimeoutError(f"{self.label} was not ready after {self.ready_timeout_s:.0f}s; "
                                   f"see {self.log_path}:\n{self.log_tail()}")
            time.sleep(self.poll_s)

    def log_tail(self, lines: int | None = None) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-(lines or self.tail_lines):])
        except OSError:
            return "(no log)"

    def __enter__(self: _Child) -> _Child:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class ServerProcess(ChildServer):
    """Context manager: start the server, wait for /readyz, and always stop it on the way out."""

    def __init__(self, base_dir: Path, heads_dir: Path, log_path: Path, *, env: dict[str, str],
                 ready_timeout_s: float = 300.0, log_level: str = "warning") -> None:
        """`env` is the server's whole HEADSERVE_* configuration: any in the caller's environment are dropped,
        so a developer's shell settings never leak into a measurement or a test."""
        super().__init__(log_path, ready_timeout_s)
        self.base_dir, self.heads_dir = base_dir, heads_dir
        self.extra_env, self.log_level = env, log_level

    def start(self) -> None:
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("HEADSERVE_")}
        env = {**inherited, **self.extra_env}
        cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--base-model", str(self.base_dir), "--heads-dir", str(self.heads_dir), "--log-level", self.log_level]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")  # the child gets its own copy of the descriptor
        try:
            self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()  # the child keeps its own copy of the descriptor
        self._wait_ready()

    def _wait_ready(self) -> None:
        with HeadserveClient(self.url, timeout=5.0) as client:
            def ready() -> bool:
                try:
                    client.ready()
                except HeadserveError:
                    return False
                return True

            self.wait_ready(ready)

    def stop(self) -> None:
        """SIGINT first (uvicorn shuts down cleanly), then SIGKILL if it lingers."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
