"""Train one output head on a frozen base: `python -m training.fit --data data/my-math --task math --out runs/my-math`.

Only the head trains (AdamW over its parameters); the base stays in eval mode without grad. The
base's hidden states at target positions are computed once (training/hidden_cache.py), so every
epoch costs only the head. The head folder, loss curve included, is written atomically at the end:
Ctrl-C leaves the previous head or none, and a head never changes after it became visible.

`torchrun --nproc_per_node N -m training.fit ...` trains the same head on N processes
(training/distributed.py): each runs the base over its own share of the examples, each global batch
(--batch-size examples, the same ones one process would take) is split by owner, gradients are summed
with DistributedDataParallel (gloo on CPU, nccl on GPU), and rank 0 alone writes the head.
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from heads import (
    CONFIG_NAME,
    BackwardAttentionConfig,
    BackwardAttentionHead,
    HeadError,
    HeadModule,
    LinearHead,
    LowRankConfig,
    LowRankHead,
    matched_rank,
    save_head,
)
from heads.base import Base, default_base, load_base
from heads.base_sources import base_names_help
from heads.errors import BaseModelError
from heads.prompts import PROMPT_FORMATS, PROMPT_PLACEHOLDER, training_style
from training import classify_data, cli, fit_classifier
from training.data import DataError, encode, load_examples
from training.distributed import ONE_PROCESS, DistributedSetupError, Ranks, from_env
from training.hidden_cache import DEFAULT_CHUNK_ROWS, TargetStates, chunked_cross_entropy, target_states

log = logging.getLogger("training.fit")
Encoded = list[tuple[list[int], int]]
LOSS_CURVE_NAME = "loss_curve.png"  # part of the head folder: it counts in the head's `bytes`


@dataclass
class History:
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)


KINDS = ("backward_attention", "linear", "lowrank", "classifier")


def backward_attention_config(args: argparse.Namespace) -> BackwardAttentionConfig:
    return BackwardAttentionConfig(latent_dim=args.latent_dim or None, num_heads=args.num_heads,
                                   weighting=args.weighting, residual=args.residual, chunk_size=args.chunk_size)


def build_head(args: argparse.Namespace, base: Base) -> HeadModule:
    """The head to train. A lowrank head's rank defaults to the one whose parameter count is closest to the
    backward-attention head these arguments describe: the control for "any low-rank correction helps"."""
    if args.kind == "linear":
        return LinearHead(vocab_size=base.vocab_size, n_embd=base.n_embd).init_from(base.embeddings)
    if args.kind == "lowrank":
        rank = args.rank or matched_rank(base.vocab_size, base.n_embd, backward_attention_config(args)
                                         .parameter_count(base.vocab_size, base.n_embd), tied=args.tied)
        return LowRankHead(LowRankConfig(rank=rank, tied=args.tied), vocab_size=base.vocab_size, n_embd=base.n_embd)
    return BackwardAttentionHead(backward_attention_config(args), vocab_size=base.vocab_size, n_embd=base.n_embd)


def train_step(head: nn.Module, states: TargetStates, examples: list[int], embeddings: Tensor,
               optimizer: torch.optim.Optimizer, chunk_rows: int, ranks: Ranks = ONE_PROCESS,
               batch_targets: int | None = None) -> tuple[float, int]:
    """One optimizer step over these examples' target positions: (mean loss, target tokens) of the whole batch.

    Under torchrun `head` is the DDP-wrapped head, `examples` this rank's rows of the global batch and
    `batch_targets` the whole batch's target count: every rank divides its summed loss by it, so the gradients
    summed over the ranks are one process's gradient, and the clip and the step that follow are the same on all.
    """
    hidden, targets = states.rows(examples, embeddings.device)
    optimizer.zero_grad(set_to_none=True)
    n = len(targets) if batch_targets is None else batch_targets
    if isinstance(head, DistributedDataParallel):
        total = ranks.sum(backward_on_ranks(head, hidden, targets, embeddings, chunk_rows, n))[0]
    else:
        total, _ = chunked_cross_entropy(head, hidden, targets, embeddings, chunk_rows=chunk_rows, backward=True)
    torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
    optimizer.step()
    return total / max(1, n), n


def backward_on_ranks(model: DistributedDataParallel, hidden: Tensor, targets: Tensor, embeddings: Tensor,
                      chunk_rows: int, batch_targets: int) -> float:
    """This rank's summed loss; its gradients are summed with every other rank's on the way.

    DDP all-reduces in the backward of a forward run outside `no_sync()`, and every rank must run exactly one
    such backward per step whatever its share of the batch: its last chunk, or an empty forward (a zero
    gradient that still joins the all-reduce) when it owns none of the batch. Earlier chunks accumulate locally.
    """
    last = (len(targets) - 1) // chunk_rows * chunk_rows if len(targets) else 0  # first row of the last chunk
    total = 0.0
    if last:
        with model.no_sync():
            total, _ = chunked_cross_entropy(model, hidden[:last], targets[:last], embeddings, chunk_rows=chunk_rows,
                                             backward=True, denominator=batch_targets)
    if not len(targets):
        (model(hidden[None], embeddings).sum() * 0.0).backward()  # (1, 0, V): no rows, every parameter in the graph
        return total
    tail, _ = chunked_cross_entropy(model, hidden[last:], targets[last:], embeddings, chunk_rows=chunk_rows,
                                    backward=True, denominator=batch_targets)
    return total + tail


@torch.no_grad()
def evaluate_loss(head: nn.Module | None, states: TargetStates | None, embeddings: Tensor, chunk_rows: int,
                  ranks: Ranks = ONE_PROCESS) -> float:
    """Mean cross-entropy over every target of `states`; `head=None` is the base's own LM head.

    Under torchrun every rank scores its own held-out shard (`None`: it owns none) and the sums are added up,
    so every rank must call this at the same point.
    """
    total, n = 0.0, 0
    if states is not None:
        was_training = head.training if head is not None else False
        if head is not None:
            head.eval()
        hidden, targets = states.rows(range(len(states)), embeddings.device)
        total, n = chunked_cross_entropy(head, hidden, targets, embeddings, chunk_rows=chunk_rows)
        if head is not None:
            head.train(was_training)
    total, count = ranks.sum(total, n)
    return total / max(1, count)


def pass_record(states: TargetStates, ranks: Ranks) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the hidden-state pass, the processes) as the training block records them.

    The ranks' passes run side by side over disjoint shards: the pass's tokens are all of theirs, its
    seconds the slowest rank's.
    """
    per_rank = ranks.gather(states.stats())
    hidden_pass = per_rank[0]
    if len(per_rank) > 1:
        tokens, seconds = sum(p["pass_tokens"] for p in per_rank), max(p["pass_seconds"] for p in per_rank)
        hidden_pass = {"examples": sum(p["examples"] for p in per_rank),
                       "target_tokens": sum(p["target_tokens"] for p in per_rank), "pass_tokens": tokens,
                       "pass_seconds": seconds, "from_disk": all(p["from_disk"] for p in per_rank),
                       "pass_tokens_per_s": round(tokens / seconds, 1) if seconds else None}
    processes = {"world_size": ranks.world, "backend": ranks.backend,
                 "pass_seconds_per_rank": [p["pass_seconds"] for p in per_rank],
                 "examples_per_rank": [p["examples"] for p in per_rank]}
    return hidden_pass, processes


def plot_history(history: History, title: str) -> bytes:
    """The loss curve as PNG bytes, to be written with the head (`save_head(extra_files=...)`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(history.steps, history.train_loss, label="train", linewidth=1)
    if history.eval_steps:
        ax.plot(history.eval_steps, history.eval_loss, "o-", label="held-out")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title=title)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    return png.getvalue()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.parser("training.fit", __doc__)
    p.add_argument("--base", default=None, help=f"{base_names_help()} (default: HEADSERVE_BASE_MODEL or the "
                   "embedded base)")
    p.add_argument("--data", required=True, help="JSONL/Parquet file, folder with train.jsonl, or HF dataset id")
    p.add_argument("--task", required=True, help="what the head is for, recorded in head_config.json")
    p.add_argument("--kind", choices=KINDS, default="backward_attention",
                   help="head kind: the backward-attention head, a trainable copy of the LM head, the LM head plus a "
                   "trained low-rank correction, or a classifier of text/label rows (training/fit_classifier.py)")
    p.add_argument("--rank", type=int, default=None, help="rank of a lowrank head (default: the rank that matches "
                   "the backward-attention head's parameter count)")
    p.add_argument("--tied", action=argparse.BooleanOptionalAction, default=True,
                   help="lowrank: the correction's left factor is the embeddings (E B A h), as the backward-attention "
                   "head's is; --no-tied trains a free (V, r) factor")
    p.add_argument("--out", type=Path, required=True, help="head folder to write (replaced atomically if it exists)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the rows (default: 3; classifier: 20)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, default=16, help="examples per optimizer step (under torchrun: all "
                   "processes together, the same batches one process takes)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 3e-3 backward_attention, "
                   "1e-3 lowrank, 3e-4 linear)")
    p.add_argument("--latent-dim", type=int, default=64, help="latent width L of the vocabulary keys; 0 keeps the "
                   "base width")
    p.add_argument("--num-heads", type=int, default=2, help="attention heads H of the backward-attention head")
    p.add_argument("--weighting", choices=("logits", "probs"), default="logits",
                   help="how the base's logits weight the values (docs/design.md)")
    p.add_argument("--residual", action=argparse.BooleanOptionalAction, default=True,
                   help="add the base's logits (scaled by a learnt alpha) to the head's")
    p.add_argument("--chunk-size", type=int, default=None, help="vocabulary chunk for the scores (bounds memory)")
    p.add_argument("--seed", type=int, default=0, help="initialisation, shuffling and held-out split")
    p.add_argument("--device", default="cpu", help="torch device for the base and the head (under "
                   "torchrun: cuda means each rank's own GPU, cuda:LOCAL_RANK)")
    p.add_argument("--eval-every", type=int, default=50, help="held-out loss every N steps (0: only at the end)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of training rows held out for eval")
    p.add_argument("--limit", type=int, default=None, help="use at most this many training rows")
    p.add_argument("--max-len", type=int, default=None, help="token budget per example (default: base context)")
    p.add_argument("--prompt-template", default=None, help="how a problem becomes the prompt; the head records it "
                   "and the server formats requests with it (default: 'Problem: {problem}\\nSolution:' for plain "
                   "prompts, '{problem}' for chat)")
    p.add_argument("--prompt-format", choices=("auto", *PROMPT_FORMATS), default="auto",
                   help="chat: the filled template is the user message of the base's chat template; auto: chat when "
                   "the base has a chat template")
    p.add_argument("--cache-hidden", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the base's hidden-state pass on disk (float16, under HEADSERVE_CACHE_DIR) so another "
                   "fit on the same data and base skips it")
    p.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, help="target tokens per cross-entropy "
                   "chunk: memory is chunk-rows x vocabulary floats, whatever the batch")
    fit_classifier.add_arguments(p)
    args = fit_classifier.resolve(p.parse_args(argv), p)
    if args.lr is None:
        args.lr = {"linear": 3e-4, "lowrank": 1e-3}.get(args.kind, 3e-3)
    if args.epochs < 1 or args.batch_size < 1 or not 0 <= args.val_fraction < 1:
        p.error("--epochs and --batch-size must be >= 1 and --val-fraction in [0, 1)")
    if args.prompt_template is not None and PROMPT_PLACEHOLDER not in args.prompt_template:
        p.error("--prompt-template must contain {problem}")
    return args


def fit(args: argparse.Namespace, ranks: Ranks | None = None) -> dict[str, Any]:
    """Train and write the head (rank 0 writes; under torchrun every rank runs this, in step with the others)."""
    ranks = ranks or Ranks(device=args.device)
    torch.manual_seed(args.seed)
    base = load_base(args.base or default_base(), device=ranks.device)
    words = classify_data.verbalizer(args.label_words, args.labels)  # text/label rows, label words as targets
    examples, stats = (words.load if words else load_examples)(args.data, "train", limit=args.limit)
    if stats.skipped:
        log.warning("skipped %d of %d rows: %s", sum(stats.skipped.values()), stats.rows, stats.skipped)
    random.Random(args.seed).shuffle(examples)
    n_val = int(len(examples) * args.val_fraction)
    max_len = min(args.max_len or base.n_positions, base.n_positions)
    style = training_style(base.tokenizer, args.prompt_format, args.prompt_template)
    train, train_stats = (words.encode if words else encode)(examples[n_val:], base.tokenizer, max_len, style)
    val, _ = (words.encode if words else encode)(examples[:n_val], base.tokenizer, max_len, style)
    if len(train) < ranks.world:
        raise DataError(f"{args.data}: {len(train)} usable training rows for {ranks.world} processes "
                        f"({stats.rows} read, skipped {stats.skipped})")
    log.info("%d train / %d held-out examples; %d truncated, %d dropped (prompt too long)", len(train), len(val),
             train_stats.truncated, train_stats.dropped)

    # Each rank runs the base over the examples it owns only (training/distributed.py says which); a shard is
    # other data than the whole set, so its states are cached under a key of their own.
    where = f", rank {ranks.rank} of {ranks.world}" if ranks.world > 1 else ""
    train_states = target_states(base, ranks.shard(train), use_disk=args.cache_hidden, desc=f"base pass (train{where})")
    val_shard = ranks.shard(val)
    val_states = target_states(base, val_shard, use_disk=args.cache_hidden,
                               desc=f"base pass (held-out{where})") if val_shard else None
    hidden_pass, processes = pass_record(train_states, ranks)
    log.info("hidden states: %s", hidden_pass)
    batch_targets = [len(ids) - prompt_len for ids, prompt_len in train]  # every rank knows every example's count

    head = build_head(args, base).to(base.device)
    head.train()
    model = ranks.wrap(head)  # DDP under torchrun, the head itself otherwise
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total_steps = min(args.max_steps or 10**12, steps_per_epoch * args.epochs)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    order = torch.Generator().manual_seed(args.seed)
    history, step, tokens, train_seconds = History(), 0, 0, 0.0  # seconds of training steps only, no evals
    embeddings = base.embeddings.detach()
    started = time.time()
    bar = tqdm(total=total_steps, desc=f"fit {args.task} ({args.kind})", file=sys.stderr, dynamic_ncols=True,
               disable=not ranks.main)
    for epoch in range(args.epochs):
        perm = torch.randperm(len(train), generator=order).tolist()  # the same on every rank: one seed
        for start in range(0, len(perm), args.batch_size):
            if step >= total_steps:
                break
            step_start = time.perf_counter()
            batch = perm[start: start + args.batch_size]  # the global batch; this rank trains on the rows it owns
            loss, n = train_step(model, train_states, ranks.local(batch), embeddings, optimizer, args.chunk_rows,
                                 ranks, sum(batch_targets[i] for i in batch))
            schedule.step()
            step, tokens = step + 1, tokens + n
            history.steps.append(step)
            history.train_loss.append(loss)
            train_seconds += time.perf_counter() - step_start
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / max(1e-9, train_seconds):.0f}", epoch=epoch)
            bar.update()
            if val and args.eval_every and step % args.eval_every == 0:
                history.eval_steps.append(step)
                history.eval_loss.append(evaluate_loss(head, val_states, embeddings, args.chunk_rows, ranks))
    bar.close()
    head.eval()
    val_loss = evaluate_loss(head, val_states, embeddings, args.chunk_rows, ranks) if val else None
    # The base's own LM head on the same held-out rows: what the head's loss is worth (lower is better than it).
    base_val_loss = evaluate_loss(None, val_states, embeddings, args.chunk_rows, ranks) if val else None
    if val_loss is not None and (not history.eval_steps or history.eval_steps[-1] != step):
        history.eval_steps.append(step)
        history.eval_loss.append(val_loss)

    training = {
        "data": str(args.data), "examples": len(train), "held_out_examples": len(val), "rows_read": stats.rows,
        "rows_skipped": stats.skipped, "truncated": train_stats.truncated, "dropped": train_stats.dropped,
        "epochs": args.epochs, "steps": step, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
        "parameters": sum(p.numel() for p in head.parameters()),
        "target_tokens": tokens, "wall_time_s": round(time.time() - started, 2),
        "tokens_per_s": round(tokens / max(1e-9, train_seconds), 1),
        "hidden_pass": hidden_pass, "processes": processes,
        "final_metrics": {
            "train_loss": round(history.train_loss[-1], 4),
            "held_out_loss": round(val_loss, 4) if val_loss is not None else None,
            "held_out_perplexity": round(math.exp(val_loss), 4) if val_loss is not None else None,
            "base_held_out_loss": round(base_val_loss, 4) if base_val_loss is not None else None,
        },
    }
    # The curve is written with the head, in the same atomic swap: the folder never changes once visible,
    # and its `bytes` (every file in it) are final from the first listing. Every rank holds the same head;
    # one writes it, and the others wait until it is written.
    if ranks.main:
        curve = plot_history(history, f"{args.task} ({args.kind})")
        save_head(head, args.out, base.info(), task=args.task, prompt_template=style.template,
                  prompt_format=style.format, training=training, extra_files={LOSS_CURVE_NAME: curve},
                  **(words.metadata(base.tokenizer, style) if words else {}))
    ranks.barrier()
    return training


def summary(args: argparse.Namespace, training: dict[str, Any]) -> str:
    """What was written, how well and how fast it trained, and the commands that evaluate and serve it."""
    m = training["final_metrics"]
    held_out = (f"held-out loss {m['held_out_loss']} (perplexity {m['held_out_perplexity']}; the base's own head: "
                f"{m['base_held_out_loss']})"
                if m["held_out_loss"] is not None else f"train loss {m['train_loss']} (no held-out rows)")
    hp = training["hidden_pass"]
    base_pass = "read from an earlier pass" if hp["from_disk"] else \
        f"{hp['pass_tokens']:,} tokens in {hp['pass_seconds']:.0f} s ({hp['pass_tokens_per_s']:,.0f} tok/s)"
    speed = f"base pass {base_pass}; head {training['tokens_per_s']:,.0f} target tokens/s"
    name = args.out.resolve().name
    world, backend = training["processes"]["world_size"], training["processes"]["backend"]
    processes = f" on {world} processes ({backend})" if world > 1 else ""
    return "\n".join([
        f"wrote {args.out}: {args.kind} head for {args.task!r}, {training['steps']} steps in "
        f"{training['wall_time_s']:.0f} s{processes}, {held_out}",
        f"  loss curve: {args.out / LOSS_CURVE_NAME}",
        f"  speed: {speed}",
        cli.next_steps([
            cli.command("training.evaluate", "--heads", args.out, "--data", args.data, "--out", f"reports/{name}"),
            cli.command("clients", "register", args.out, "--name", name) + "   # with the server running",
        ]),
    ])


def main(argv: list[str] | None = None) -> None:
    rank = f"[rank {os.environ['RANK']}] " if "RANK" in os.environ else ""  # torchrun mixes every rank's output
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s {rank}%(message)s")
    args = parse_args(argv)
    if (args.out / CONFIG_NAME).exists() and os.environ.get("RANK", "0") == "0":
        log.warning("%s holds a head already: it is replaced when training ends (a server reading it swaps too)",
                    args.out)
    ranks = ONE_PROCESS
    try:
        ranks = from_env(args.device)  # joins torchrun's process group when torchrun started this process
        training = (fit_classifier.fit if args.kind == "classifier" else fit)(args, ranks)
    except KeyboardInterrupt:
        print(f"interrupted: {args.out} was not written (any previous head there is unchanged)", file=sys.stderr)
        raise SystemExit(130) from None
    except (BaseModelError, DataError, DistributedSetupError, HeadError, OSError, ValueError) as e:
        # A rank that fails exits nonzero, and torchrun then stops the others.
        print(f"error: {rank}{e}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        ranks.close()
    if ranks.main:
        print((fit_classifier.summary if args.kind == "classifier" else summary)(args, training))


if __name__ == "__main__":
    main()
