"""Throughput of the Ray Serve deployment (server/ray_app.py) with 1 and then 2 replicas on this machine.

Both runs get the same CPUs from Ray (one replica with all of them, or each replica with its share; Ray sets
each replica's OMP_NUM_THREADS to its share unless --threads fixes it), so the comparison is one engine
batching everything against two engines splitting the load behind Ray's proxy. Each run: a warm-up, then
ROUNDS rounds of `--requests` concurrent greedy /generate requests of `--tokens` tokens (ignore_eos, so every
request costs the same), on the embedded base and its `math` head; the median round's generated tokens per
second is reported.

    python -m bench.ray_scaling [--replicas 1 2] [--requests 32] [--tokens 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from heads.base import SHIPPED_HEADS

# Ray on loopback only, as on a laptop (read when ray is imported, inherited by the processes Ray starts).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

ROUNDS = 3
READY_TIMEOUT_S = 180.0
log = logging.getLogger("bench.ray_scaling")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(http: httpx.Client) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if http.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise TimeoutError("the Ray application never became ready")


def _round(http: httpx.Client, requests: int, tokens: int) -> tuple[float, set[str]]:
    """One round of `requests` concurrent generations: tokens per second, and the replicas that answered."""
    def one(i: int) -> httpx.Response:
        body = {"prompt": f"What is {i} plus {i + 7}?", "head": "math", "max_new_tokens": tokens,
                "ignore_eos": True, "decoding": {"strategy": "greedy"}}
        return http.post("/generate", json=body)

    start = time.perf_counter()
    with ThreadPoolExecutor(requests) as pool:
        answers = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    for answer in answers:
        answer.raise_for_status()
    generated = sum(answer.json()["tokens"] for answer in answers)
    return generated / wall, {answer.headers["x-headserve-replica"] for answer in answers}


def measure(replicas: list[int], requests: int, tokens: int, cpus: int, threads: int | None) -> dict[str, Any]:
    import ray
    from ray import serve

    from server.ray_app import build_app

    if threads is None:
        os.environ.pop("OMP_NUM_THREADS", None)  # Ray then gives each replica threads for its share of the CPUs
    else:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by every replica
    heads_dir = Path(tempfile.mkdtemp(prefix="ray-scaling-"))
    shutil.copytree(SHIPPED_HEADS / "math", heads_dir / "math")
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, object_store_memory=80 * 1024 * 1024,
             log_to_driver=False, configure_logging=False)
    results: dict[str, Any] = {}
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300.0) as http:
            for count in replicas:
                app = build_app({"replicas": count, "num_cpus": cpus / count, "heads_dir": str(heads_dir),
                                 "device": "cpu", "max_new_tokens": tokens, "max_batch_size": requests})
                serve.run(app, name="headserve", route_prefix="/", blocking=False)
                _wait_ready(http)
                _round(http, requests, tokens)  # warm-up: every replica loads the head, fills its caches
                rounds = [_round(http, requests, tokens) for _ in range(ROUNDS)]
                rates = [rate for rate, _ in rounds]
                results[str(count)] = {"tokens_per_s": round(statistics.median(rates), 1),
                                       "rounds_tokens_per_s": [round(r, 1) for r in rates],
                                       "replicas_answering": max(len(seen) for _, seen in rounds)}
                log.info("%d replica(s): %s", count, results[str(count)])
                serve.delete("headserve")
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(heads_dir, ignore_errors=True)
    return {"cores": os.cpu_count(), "ray_cpus": cpus, "threads_per_replica": threads or "cpus / replicas",
            "requests": requests, "tokens": tokens,
            "load_average_1m": round(os.getloadavg()[0], 2), "replicas": results}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ray_scaling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--requests", type=int, default=32, help="concurrent requests per round")
    parser.add_argument("--tokens", type=int, default=32, help="tokens each request generates")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs Ray shares among the replicas")
    parser.add_argument("--threads", type=int, help="torch threads in every replica (default: its share of --cpus); "
                        "1 keeps OpenMP from spinning on a machine other work keeps busy")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    json.dump(measure(args.replicas, args.requests, args.tokens, args.cpus, args.threads), sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
