"""What POST /classify costs on a real server: latency one request at a time, and throughput under concurrency.

Why over HTTP on the real server (bench/server_proc.py): a classification is one prefill with no decode, so
its cost is mostly what surrounds the forward (the request, tokenising, the queue, the engine step, the
answer); only a separate server process pays those as a deployment does. Each request carries one text; the
classifier head is built on the spot with random weights, which costs exactly what a trained one does. Per
scorer (a classifier head pooling by mean, and the base scored on label words):

- batch 1: `--requests` requests one after another; median and p90 seconds, and texts/s;
- concurrent: rounds of `--concurrency` requests sent together (one thread and connection each); texts per
  wall second over all rounds, and the median and p90 latency a request sees under that load.

    OMP_NUM_THREADS=1 python -m bench.classify_cost --requests 64 --concurrency 32 --rounds 4
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch

from bench.server_proc import ServerProcess
from bench.stats import median, percentile, ratio
from heads import ClassifierConfig, ClassifierHead, save_head
from heads.base import EMBEDDED_BASE, load_base

TEXTS = ["A gorgeous, witty, seductive movie.", "The plot is a mess and the jokes fall flat.",
         "Neither as funny nor as clever as it thinks it is, but the cast keeps it watchable.",
         "An hour and a half of my life I will not get back.", "Easily the best film of the year.",
         "It is what it is: a sequel.", "The score soars, the dialogue sinks.", "I laughed, I cried, I left early."]
TEMPLATE = "Review: {problem}\nSentiment:"
SCORERS: dict[str, dict[str, Any]] = {
    "classifier (mean pooling)": {"head": "sentiment"},
    "base, label words": {"label_words": [" The", " apples"]},
}


def build_registry(base_dir: Path, heads_dir: Path) -> None:
    base = load_base(str(base_dir))
    torch.manual_seed(0)
    head = ClassifierHead(ClassifierConfig(labels=["negative", "positive"], pooling="mean"),
                          vocab_size=base.vocab_size, n_embd=base.n_embd)
    save_head(head, heads_dir / "sentiment", base.info(), task="sentiment", prompt_template=TEMPLATE)


def post(client: httpx.Client, body: dict[str, Any]) -> float:
    start = time.perf_counter()
    response = client.post("/classify", json=body)
    response.raise_for_status()
    return time.perf_counter() - start


def latency_stats(latencies: list[float], texts: int, seconds: float) -> dict[str, float]:
    return {"median_s": median(latencies), "p90_s": percentile(latencies, 90), "texts_per_s": ratio(texts, seconds)}


def measure(url: str, extra: dict[str, Any], requests: int, concurrency: int, rounds: int) -> dict[str, Any]:
    bodies = [{"text": TEXTS[i % len(TEXTS)], **extra} for i in range(max(requests, concurrency))]
    with httpx.Client(base_url=url, timeout=60) as client:
        for body in bodies[:4]:  # warm-up: the head's load, first-call costs
            post(client, body)
        start = time.perf_counter()
        sequential = [post(client, body) for body in bodies[:requests]]
        one_at_a_time = latency_stats(sequential, requests, time.perf_counter() - start)
    clients = [httpx.Client(base_url=url, timeout=120) for _ in range(concurrency)]
    try:
        with ThreadPoolExecutor(concurrency) as pool:
            loaded: list[float] = []
            start = time.perf_counter()
            for _ in range(rounds):
                loaded += list(pool.map(post, clients, bodies[:concurrency]))
            together = latency_stats(loaded, concurrency * rounds, time.perf_counter() - start)
    finally:
        for c in clients:
            c.close()
    return {"batch_1": one_at_a_time, f"concurrent_{concurrency}": together}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.classify_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, default=EMBEDDED_BASE, help="base model folder (default: the embedded)")
    parser.add_argument("--requests", type=int, default=64, help="sequential requests (batch 1)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests sent together per round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of concurrent requests")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        heads_dir = Path(tmp) / "heads"
        build_registry(args.base, heads_dir)
        env = {"HEADSERVE_MAX_QUEUE": str(max(64, 2 * args.concurrency)), "HEADSERVE_DEVICE": "cpu"}
        with ServerProcess(args.base, heads_dir, Path(tmp) / "server.log", env=env) as server:
            results = {"base": str(args.base), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                       "scorers": {name: measure(server.url, extra, args.requests, args.concurrency, args.rounds)
                                   for name, extra in SCORERS.items()}}
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
