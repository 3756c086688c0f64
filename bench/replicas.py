"""Several real servers on one registry folder, as replicas behind a router share one volume, and how long a
registration made through one takes to reach the others.

`replicas()` starts the processes side by side (each loads the base on its own) and always stops them;
the consistency tests (tests/integration/test_replicas.py) use it too. `python -m bench.replicas` measures
the propagation delay: register a head on the first replica, then poll every other one every 10 ms until
it lists the head, and until it generates with it (which includes that replica's first load of the head).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from bench.server_proc import ServerProcess
from heads import CONFIG_NAME, WEIGHTS_NAME
from heads.base import EMBEDDED_BASE, SHIPPED_HEADS


@contextmanager
def replicas(count: int, base_dir: Path, heads_dir: Path, log_dir: Path, *, token: str,
             ready_timeout_s: float = 180.0) -> Iterator[list[ServerProcess]]:
    """`count` servers (`python -m server`) on free ports, all on `heads_dir`, ready; stopped on the way out."""
    # One thread each: OpenMP spinning on a busy machine slows a small model's steps many times over.
    env = {"OMP_NUM_THREADS": "1", "HEADSERVE_ADMIN_TOKEN": token}
    servers = [ServerProcess(base_dir, heads_dir, log_dir / f"replica-{i}.log", env=env,
                             ready_timeout_s=ready_timeout_s, log_level="info") for i in range(count)]
    try:
        with ThreadPoolExecutor(count) as pool:
            for started in [pool.submit(server.start) for server in servers]:
                started.result()
        yield servers
    finally:
        with ThreadPoolExecutor(count) as pool:  # side by side too: each may take seconds to shut down
            list(pool.map(lambda server: server.stop(), servers))


def upload(http: httpx.Client, name: str, files: dict[str, bytes], token: str, *,
           replace: bool = False) -> httpx.Response:
    """POST /heads with a head's two files (`config`, `weights`) under `name`."""
    return http.post("/heads", params={"replace": "true"} if replace else None, data={"name": name},
                     files={field: (field, data) for field, data in files.items()},
                     headers={"Authorization": f"Bearer {token}"})


def head_files(folder: Path) -> dict[str, bytes]:
    return {"config": (folder / CONFIG_NAME).read_bytes(), "weights": (folder / WEIGHTS_NAME).read_bytes()}


def _poll(http: httpx.Client, method: str, path: str, poll_s: float, timeout_s: float,
          **kwargs: Any) -> tuple[float, int]:
    """Seconds until `method path` first answers 200 (polled every `poll_s`), and how many requests that took."""
    start, tries = time.perf_counter(), 1
    while http.request(method, path, **kwargs).status_code != 200:
        if time.perf_counter() - start > timeout_s:
            raise TimeoutError(f"{http.base_url}{path} did not answer 200 within {timeout_s:.0f}s")
        time.sleep(poll_s)
        tries += 1
    return time.perf_counter() - start, tries


def propagation(urls: list[str], files: dict[str, bytes], token: str, *, registrations: int = 10,
                poll_s: float = 0.01, timeout_s: float = 60.0) -> dict[str, list[float]]:
    """For each registration on urls[0]: seconds from its 201 until each other replica lists the head
    (`listed`), and until it generates one token with it (`served`), and the requests each took (`*_tries`);
    the head is deleted again after."""
    writer, *readers = [httpx.Client(base_url=url, timeout=60.0) for url in urls]
    out: dict[str, list[float]] = {"listed": [], "served": [], "listed_tries": [], "served_tries": []}
    try:
        for i in range(registrations):
            name = f"propagation-{i}"
            answer = upload(writer, name, files, token)
            answer.raise_for_status()
            for reader in readers:
                seconds, tries = _poll(reader, "GET", f"/heads/{name}", poll_s, timeout_s)
                out["listed"].append(seconds)
                out["listed_tries"].append(tries)
            answer = upload(writer, name, files, token, replace=True)  # a new version the readers have not loaded
            answer.raise_for_status()
            body = {"prompt": "1 + 1 =", "head": name, "max_new_tokens": 1}
            for reader in readers:
                seconds, tries = _poll(reader, "POST", "/generate", poll_s, timeout_s, json=body)
                out["served"].append(seconds)
                out["served_tries"].append(tries)
            writer.delete(f"/heads/{name}", headers={"Authorization": f"Bearer {token}"}).raise_for_status()
    finally:
        for client in (writer, *readers):
            client.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--registrations", type=int, default=10)
    parser.add_argument("--poll-ms", type=float, default=10.0)
    parser.add_argument("--base", type=Path, default=EMBEDDED_BASE)
    parser.add_argument("--head", type=Path, default=SHIPPED_HEADS / "math", help="the head folder registered")
    args = parser.parse_args(argv)
    token = "propagation-bench"
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        shutil.copytree(args.head, root / "heads" / args.head.name)
        with replicas(args.replicas, args.base, root / "heads", root / "logs", token=token) as servers:
            delays = propagation([s.url for s in servers], head_files(args.head), token,
                                 registrations=args.registrations, poll_s=args.poll_ms / 1000)
    summary = {kind: {"median_s": round(statistics.median(delays[kind]), 4), "max_s": round(max(delays[kind]), 4),
                      "samples": len(delays[kind]), "most_requests": max(delays[f"{kind}_tries"])}
               for kind in ("listed", "served")}
    print(json.dumps({"replicas": args.replicas, "poll_ms": args.poll_ms, **summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
