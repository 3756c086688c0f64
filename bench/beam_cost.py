"""What a beam costs: latency and tokens/s of beam search against greedy (num_beams 1) in the engine.

Why in process and on the engine itself: beam search adds no HTTP work, only rows to every engine step
(one per beam) and the per-step bookkeeping of server/beams.py (a top-k over num_beams x V scores,
hypotheses, cache forks), so driving `Engine.run_until_done` measures exactly that. Every request
ignores EOS, so each answer is exactly `--max-new-tokens` tokens and every configuration does the same
number of steps: the rates compare like with like. Two figures per beam count:

- latency: one request at a time (each prompt in turn); median and p90 seconds, the answer's
  tokens/s at the median, and the median against the first beam count's (1: greedy); also the process's
  CPU time per answer token, which a machine busy with other work disturbs less than wall time;
- throughput: `--concurrency` requests submitted together; answer tokens per wall second, and the
  batch rows that took (num_beams per request).

    OMP_NUM_THREADS=2 python -m bench.beam_cost --beams 1 2 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.stats import median, percentile, ratio, throughput
from heads import load_head
from heads.base import EMBEDDED_BASE, Base, load_base
from heads.sampling import SamplingParams
from server.engine import Engine
from server.metrics import Metrics
from server.sequence import GenerationJob

PROMPTS = ["Problem: Tom has 3 boxes with 14 pens each. How many pens?\nSolution:", "The answer is",
           "Problem: A farmer sells 7 eggs a day for 12 days. How many eggs does he sell?\nSolution:", "45 + 38 =",
           "Problem: What is 96 - 17?\nSolution:", "eggs", "Problem: Ann reads 5 pages a day for 6 days.\nSolution:",
           "9 +"]


def params_for(beams: int) -> SamplingParams:
    """One beam is greedy decoding, as /generate (and transformers) make it."""
    return SamplingParams() if beams == 1 else SamplingParams(strategy="beam", num_beams=beams)


def jobs(base: Base, head: Any, label: str, beams: int, count: int, max_new_tokens: int) -> list[GenerationJob]:
    return [GenerationJob(prompt_ids=list(base.tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"]), head=head,
                          head_label=label, params=params_for(beams), seed=i, max_new_tokens=max_new_tokens,
                          ignore_eos=True) for i in range(count)]


def measure(engine: Engine, base: Base, head: Any, label: str, beam_counts: list[int], *, prompts: int,
            concurrency: int, max_new_tokens: int, rounds: int) -> list[dict[str, Any]]:
    """Per beam count: latency one request at a time, then throughput with `concurrency` requests together.

    The beam counts take turns within each round (after a warm-up of each), so a machine that is busier at
    one moment slows every count alike instead of one; medians over the rounds are reported.
    """
    latencies: dict[int, list[float]] = {beams: [] for beams in beam_counts}
    cpu: dict[int, list[float]] = {beams: [] for beams in beam_counts}  # process CPU seconds per request
    rates: dict[int, list[float]] = {beams: [] for beams in beam_counts}
    for beams in beam_counts:
        engine.run_until_done(jobs(base, head, label, beams, 1, max_new_tokens))  # warm-up
    for _ in range(rounds):
        for beams in beam_counts:
            for job in jobs(base, head, label, beams, prompts, max_new_tokens):
                start, start_cpu = time.perf_counter(), time.process_time()
                engine.run_until_done([job])
                latencies[beams].append(time.perf_counter() - start)
                cpu[beams].append(time.process_time() - start_cpu)
            start = time.perf_counter()
            results = engine.run_until_done(jobs(base, head, label, beams, concurrency, max_new_tokens))
            rates[beams].append(throughput(sum(len(r.main.token_ids) for r in results), time.perf_counter() - start))
    rows = []
    for beams in beam_counts:
        alone = median(latencies[beams])
        rows.append({"num_beams": beams, "latency_median_s": round(alone, 4),
                     "latency_p90_s": round(percentile(latencies[beams], 90), 4),
                     "tokens_per_s_alone": round(throughput(max_new_tokens, alone), 1),
                     "concurrency": concurrency, "batch_rows": concurrency * beams,
                     "tokens_per_s_batched": round(median(rates[beams]), 1),
                     "latency_vs_1_beam": round(ratio(alone, median(latencies[beam_counts[0]])), 2),
                     "cpu_ms_per_token_alone": round(1000 * median(cpu[beams]) / max_new_tokens, 2),
                     "cpu_vs_1_beam": round(ratio(median(cpu[beams]), median(cpu[beam_counts[0]])), 2)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.beam_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--prompts", type=int, default=8, help="requests timed one at a time")
    parser.add_argument("--concurrency", type=int, default=8, help="requests submitted together")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="rounds in which the beam counts take turns")
    parser.add_argument("--base", type=Path, default=EMBEDDED_BASE)
    parser.add_argument("--head", type=Path, default=None, help="a head folder (default: the base's own LM head)")
    args = parser.parse_args(argv)
    base = load_base(str(args.base))
    head, label = None, "base"
    if args.head is not None:
        head, _ = load_head(args.head, fingerprint=base.fingerprint)
        head.prepare(base.embeddings)
        label = args.head.name
    width = max(args.beams) * args.concurrency
    engine = Engine(base, Metrics(), max_queue=max(64, args.concurrency), max_batch_size=width,
                    max_batch_tokens=max(4096, width))
    rows = measure(engine, base, head, label, args.beams, prompts=args.prompts, concurrency=args.concurrency,
                   max_new_tokens=args.max_new_tokens, rounds=args.rounds)
    print(json.dumps({"base": str(args.base), "head": label, "max_new_tokens": args.max_new_tokens,
                      "threads": torch.get_num_threads(), "rounds": args.rounds, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
