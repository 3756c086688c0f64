"""Requests and how they are sent: prompts, batches at a given concurrency, and per-request samples.

Why one batch runner for every scenario: "one at a time" is concurrency 1 of the same code path,
so sequential and concurrent numbers differ only in how many requests are in flight.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from bench.stats import decode_rate, median, percentile, throughput
from clients import AsyncHeadserveClient, GenerateResult

_WORDS = ("the a of to and in is that for on with as was by at from this have are an be it or which one all "
          "train apple garden river number seven twelve market teacher bought sold more less each total left "
          "morning evening basket shelf pencil ticket farmer bakery minutes hours price dollars students class "
          "how many much does what after before then now twice half every week day cookies boxes").split()
T = TypeVar("T")


@dataclass(frozen=True)
class Request:
    prompt: str
    head: str | None  # None: the base's own linear head


@dataclass(frozen=True)
class Sample:
    """What one request cost, from the client's and the server's point of view."""

    head: str | None
    tokens: int
    finish_reason: str
    latency_s: float  # client wall time, send -> response parsed
    queue_s: float
    first_token_s: float | None  # server: accepted -> first token
    total_s: float  # server: accepted -> done

    @classmethod
    def of(cls, request: Request, result: GenerateResult, latency_s: float) -> Sample:
        t = result.timings
        return cls(head=request.head, tokens=result.tokens, finish_reason=result.finish_reason, latency_s=latency_s,
                   queue_s=t.queue_s, first_token_s=t.first_token_s, total_s=t.total_s)


@dataclass
class BatchResult:
    samples: list[Sample]
    wall_s: float
    server_metrics: dict[str, float] = field(default_factory=dict)  # counters the batch added, see with_metrics

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.samples)

    @property
    def tokens_per_s(self) -> float:
        return throughput(self.tokens, self.wall_s)

    def summary(self, max_new_tokens: int) -> dict[str, Any]:
        """The numbers worth keeping from a batch (requests that stopped short show ignore_eos is not honoured)."""
        lat = [s.latency_s for s in self.samples]
        ttft = [s.first_token_s for s in self.samples if s.first_token_s is not None]
        return {"requests": len(self.samples), "tokens": self.tokens, "wall_s": self.wall_s,
                "tokens_per_s": self.tokens_per_s, "p50_latency_s": percentile(lat, 50),
                "p99_latency_s": percentile(lat, 99), "ttft_p50_s": percentile(ttft, 50),
                "short_requests": sum(1 for s in self.samples if s.tokens < max_new_tokens),
                **{f"server_{k}": v for k, v in self.server_metrics.items()}}


def make_prompts(n: int, count_tokens: Callable[[str], int], lo: int = 8, hi: int = 40, seed: int = 0) -> list[str]:
    """n English-ish prompts whose token counts cycle over lo..hi, deterministic for a seed and tokenizer."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        target = lo + (i * 7) % (hi - lo + 1)
        words: list[str] = []
        while count_tokens(" ".join(words)) < target:
            words.append(rng.choice(_WORDS))
        text = " ".join(words)
        prompts.append(text[0].upper() + text[1:])
    return prompts


def mixed_requests(prompts: Sequence[str], heads: Sequence[str | None]) -> list[Request]:
    """Request i uses prompt i and heads[i % len(heads)]."""
    return [Request(p, heads[i % len(heads)]) for i, p in enumerate(prompts)]


async def timed_generate(client: AsyncHeadserveClient, request: Request, max_new_tokens: int) -> Sample:
    start = time.perf_counter()
    result = await client.generate(request.prompt, request.head, max_new_tokens=max_new_tokens, raw=True,
                                   ignore_eos=True)
    return Sample.of(request, result, time.perf_counter() - start)


async def run_batch(client: AsyncHeadserveClient, requests: Sequence[Request], concurrency: int,
                    max_new_tokens: int) -> BatchResult:
    """Send all requests with at most `concurrency` in flight; wall time covers the whole batch."""
    return await run_requests(lambda request: timed_generate(client, request, max_new_tokens), requests, concurrency)


async def run_requests(send: Callable[[Request], Awaitable[Sample]], requests: Sequence[Request],
                       concurrency: int) -> BatchResult:
    """`run_batch` for any server: the peer benchmark sends the same requests to vLLM through this."""
    gate = asyncio.Semaphore(concurrency)

    async def one(request: Request) -> Sample:
        async with gate:
            return await send(request)

    start = time.perf_counter()
    samples = await asyncio.gather(*(one(r) for r in requests))
    return BatchResult(samples=list(samples), wall_s=time.perf_counter() - start)


def decode_rates(samples: Sequence[Sample]) -> list[float]:
    return [decode_rate(s.tokens, s.first_token_s, s.total_s) for s in samples]


async def head_vs_linear(client: AsyncHeadserveClient, prompt: str, head: str, reps: int,
                         max_new_tokens: int) -> dict[str, Any]:
    """Alternate head and base requests, one at a time, so drift on the machine hits both alike."""
    by_head: dict[str | None, list[Sample]] = {head: [], None: []}
    for rep in range(reps):
        order: list[str | None] = [head, None] if rep % 2 == 0 else [None, head]
        for name in order:
            by_head[name].append(await timed_generate(client, Request(prompt, name), max_new_tokens))
    head_rate, base_rate = median(decode_rates(by_head[head])), median(decode_rates(by_head[None]))
    return {"head_decode_tokens_per_s": head_rate, "linear_decode_tokens_per_s": base_rate,
            "ratio": head_rate / base_rate if base_rate else float("nan"), "reps": reps,
            "tokens": [s.tokens for s in by_head[head] + by_head[None]]}


async def cold_and_warm(client: AsyncHeadserveClient, prompt: str, add_head: Callable[[str], Any],
                        names: Sequence[str]) -> dict[str, Any]:
    """Time first-token for heads just added to the registry, then again once each is resident."""
    cold, warm = [], []
    for name in names:
        add_head(name)
        cold.append((await timed_generate(client, Request(prompt, name), 1)).latency_s)
        warm.append((await timed_generate(client, Request(prompt, name), 1)).latency_s)
    return {"cold_s": cold, "warm_s": warm, "head_cold_load_s": median(cold), "head_warm_first_token_s": median(warm)}


# Server metrics worth diffing around a scenario (Prometheus sample names, summed over labels).
WATCHED_METRICS = ("headserve_head_loads_total", "headserve_head_load_seconds_sum", "headserve_batch_size_sum",
                   "headserve_batch_size_count", "headserve_batch_heads_sum")


def metric_sums(text: str, names: Sequence[str] = WATCHED_METRICS) -> dict[str, float]:
    """Sum each named sample over its label sets in Prometheus text; absent metrics are left out."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in names:
            try:
                sums[name] = sums.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                continue
    return sums


def metric_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What a scenario added to each counter, plus the mean engine batch size when the server reports it."""
    delta = {k.removeprefix("headserve_"): after[k] - before.get(k, 0.0) for k in after}
    steps = delta.get("batch_size_count", 0.0)
    if steps:
        delta["mean_batch_size"] = delta.get("batch_size_sum", 0.0) / steps
        if "batch_heads_sum" in delta:
            delta["mean_heads_per_step"] = delta["batch_heads_sum"] / steps
    return delta


async def with_metrics(client: AsyncHeadserveClient, make: Callable[[], Awaitable[T]]) -> tuple[T, dict[str, float]]:
    """Run a scenario and return what it added to the server's counters (head loads, engine steps)."""
    before = metric_sums(await client.metrics_text())
    result = await make()
    return result, metric_delta(before, metric_sums(await client.metrics_text()))
