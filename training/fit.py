"""Train one output head on a frozen base: `python -m training.fit --data data/my-math --task math --out runs/my-math`.

Only the head trains (AdamW over its parameters); the base stays in eval mode without grad. The
base's final hidden states are cached during the first epoch, so later epochs cost only the
head. The head folder, loss curve included, is written atomically at the end: Ctrl-C leaves the
previous head or none, and a head never changes after it became visible.
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from heads import (
    CONFIG_NAME,
    BackwardAttentionConfig,
    BackwardAttentionHead,
    HeadError,
    HeadModule,
    LinearHead,
    save_head,
)
from heads.base import Base, default_base, load_base
from heads.base_sources import base_names_help
from heads.errors import BaseModelError
from heads.prompts import PROMPT_FORMATS, PROMPT_PLACEHOLDER, training_style
from training import cli
from training.data import DataError, collate, encode, load_examples

log = logging.getLogger("training.fit")
Encoded = list[tuple[list[int], int]]
LOSS_CURVE_NAME = "loss_curve.png"  # part of the head folder: it counts in the head's `bytes`


@dataclass
class History:
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)


def build_head(args: argparse.Namespace, base: Base) -> HeadModule:
    if args.kind == "linear":
        return LinearHead(vocab_size=base.vocab_size, n_embd=base.n_embd).init_from(base.embeddings)
    config = BackwardAttentionConfig(latent_dim=args.latent_dim or None, num_heads=args.num_heads,
                                     weighting=args.weighting, residual=args.residual, chunk_size=args.chunk_size)
    return BackwardAttentionHead(config, vocab_size=base.vocab_size, n_embd=base.n_embd)


def head_loss(head: nn.Module, hidden: Tensor, labels: Tensor, embeddings: Tensor) -> tuple[Tensor, int]:
    """Mean teacher-forced cross-entropy over target tokens; position t predicts token t+1.

    Only the positions that predict a target go through the head: prompt and padding positions would
    each cost a V-wide row (49,152 on SmolLM2) in every product and its gradient, for a zero weight."""
    targets = labels[:, 1:]  # (B, T-1)
    scored = targets != -100
    logits = head(hidden[:, :-1][scored][None], embeddings)[0]  # (N, V): a head is position-wise
    return F.cross_entropy(logits, targets[scored]), int(scored.sum())


class HiddenCache:
    """Final hidden states of the frozen base per example, filled on first sight, reused after."""

    def __init__(self, base: Base, enabled: bool) -> None:
        self.base, self.enabled = base, enabled
        self.store: dict[int, Tensor] = {}

    @torch.no_grad()
    def batch(self, indices: list[int], data: Encoded) -> tuple[Tensor, Tensor]:
        input_ids, mask, labels = collate([data[i] for i in indices], self.base.tokenizer.eos_token_id)
        input_ids, mask = input_ids.to(self.base.device), mask.to(self.base.device)
        if self.enabled and all(i in self.store for i in indices):
            hidden = torch.zeros(len(indices), input_ids.shape[1], self.base.n_embd, device=self.base.device)
            for row, i in enumerate(indices):
                hidden[row, : self.store[i].shape[0]] = self.store[i]
        else:
            hidden = self.base.hidden_states(input_ids, attention_mask=mask).last_hidden_state  # (B, T, D)
            if self.enabled:
                for row, i in enumerate(indices):
                    self.store[i] = hidden[row, : len(data[i][0])].clone()
        return hidden, labels.to(self.base.device)


@torch.no_grad()
def evaluate_loss(head: nn.Module, cache: HiddenCache, data: Encoded, batch_size: int) -> float:
    was_training = head.training
    head.eval()
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        hidden, labels = cache.batch(list(range(start, min(len(data), start + batch_size))), data)
        loss, n = head_loss(head, hidden, labels, cache.base.embeddings)
        total, count = total + loss.item() * n, count + n
    head.train(was_training)
    return total / max(1, count)


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
    p.add_argument("--kind", choices=("backward_attention", "linear"), default="backward_attention",
                   help="head kind: the backward-attention head or a trainable copy of the LM head")
    p.add_argument("--out", type=Path, required=True, help="head folder to write (replaced atomically if it exists)")
    p.add_argument("--epochs", type=int, default=3, help="passes over the training rows")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, default=16, help="examples per optimizer step")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 3e-3 backward_attention, "
                   "3e-4 linear)")
    p.add_argument("--latent-dim", type=int, default=64, help="latent width L of the vocabulary keys; 0 keeps the "
                   "base width")
    p.add_argument("--num-heads", type=int, default=2, help="attention heads H of the backward-attention head")
    p.add_argument("--weighting", choices=("logits", "probs"), default="logits",
                   help="how the base's logits weight the values (docs/design.md)")
    p.add_argument("--residual", action=argparse.BooleanOptionalAction, default=True,
                   help="add the base's logits (scaled by a learnt alpha) to the head's")
    p.add_argument("--chunk-size", type=int, default=None, help="vocabulary chunk for the scores (bounds memory)")
    p.add_argument("--seed", type=int, default=0, help="initialisation, shuffling and held-out split")
    p.add_argument("--device", default="cpu", help="torch device for the base and the head")
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
                   help="cache base hidden states after the first epoch")
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = 3e-4 if args.kind == "linear" else 3e-3
    if args.epochs < 1 or args.batch_size < 1 or not 0 <= args.val_fraction < 1:
        p.error("--epochs and --batch-size must be >= 1 and --val-fraction in [0, 1)")
    if args.prompt_template is not None and PROMPT_PLACEHOLDER not in args.prompt_template:
        p.error("--prompt-template must contain {problem}")
    return args


def fit(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    base = load_base(args.base or default_base(), device=args.device)
    examples, stats = load_examples(args.data, "train", limit=args.limit)
    if stats.skipped:
        log.warning("skipped %d of %d rows: %s", sum(stats.skipped.values()), stats.rows, stats.skipped)
    random.Random(args.seed).shuffle(examples)
    n_val = int(len(examples) * args.val_fraction)
    max_len = min(args.max_len or base.n_positions, base.n_positions)
    style = training_style(base.tokenizer, args.prompt_format, args.prompt_template)
    train, train_stats = encode(examples[n_val:], base.tokenizer, max_len, style)
    val, _ = encode(examples[:n_val], base.tokenizer, max_len, style)
    if not train:
        raise DataError(f"{args.data}: no usable training rows ({stats.rows} read, skipped {stats.skipped})")
    log.info("%d train / %d held-out examples; %d truncated, %d dropped (prompt too long)", len(train), len(val),
             train_stats.truncated, train_stats.dropped)

    head = build_head(args, base).to(base.device)
    head.train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total_steps = min(args.max_steps or 10**12, steps_per_epoch * args.epochs)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    cache_train, cache_val = HiddenCache(base, args.cache_hidden), HiddenCache(base, args.cache_hidden)
    order = torch.Generator().manual_seed(args.seed)
    history, step, tokens = History(), 0, 0
    speed: dict[int, tuple[int, float]] = {}  # epoch -> (target tokens, seconds)
    started = time.time()
    bar = tqdm(total=total_steps, desc=f"fit {args.task}", file=sys.stderr, dynamic_ncols=True)
    for epoch in range(args.epochs):
        epoch_tokens, epoch_seconds = 0, 0.0  # training steps only; held-out evals are not counted
        perm = torch.randperm(len(train), generator=order).tolist()
        for start in range(0, len(perm), args.batch_size):
            if step >= total_steps:
                break
            step_start = time.perf_counter()
            hidden, labels = cache_train.batch(perm[start: start + args.batch_size], train)
            loss, n = head_loss(head, hidden, labels, base.embeddings)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step, tokens, epoch_tokens = step + 1, tokens + n, epoch_tokens + n
            history.steps.append(step)
            history.train_loss.append(loss.item())
            epoch_seconds += time.perf_counter() - step_start
            rate = epoch_tokens / max(1e-9, epoch_seconds)
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{rate:.0f}", epoch=epoch)
            bar.update()
            if val and args.eval_every and step % args.eval_every == 0:
                history.eval_steps.append(step)
                history.eval_loss.append(evaluate_loss(head, cache_val, val, args.batch_size))
        speed[epoch] = (epoch_tokens, epoch_seconds)
    bar.close()
    head.eval()
    val_loss = evaluate_loss(head, cache_val, val, args.batch_size) if val else None
    # The base's own LM head on the same held-out rows: what the head's loss is worth (lower is better than it).
    base_head = LinearHead(vocab_size=base.vocab_size, n_embd=base.n_embd).init_from(base.embeddings).to(base.device)
    base_val_loss = evaluate_loss(base_head, cache_val, val, args.batch_size) if val else None
    if val_loss is not None and (not history.eval_steps or history.eval_steps[-1] != step):
        history.eval_steps.append(step)
        history.eval_loss.append(val_loss)

    first = speed[0]
    later = [speed[e] for e in speed if e > 0 and speed[e][0]]
    tps_first = first[0] / max(1e-9, first[1])
    tps_cached = sum(t for t, _ in later) / max(1e-9, sum(s for _, s in later)) if later else None
    training = {
        "data": str(args.data), "examples": len(train), "held_out_examples": len(val), "rows_read": stats.rows,
        "rows_skipped": stats.skipped, "truncated": train_stats.truncated, "dropped": train_stats.dropped,
        "epochs": args.epochs, "steps": step, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
        "target_tokens": tokens, "wall_time_s": round(time.time() - started, 2),
        "tokens_per_s_first_epoch": round(tps_first, 1),
        "tokens_per_s_cached": round(tps_cached, 1) if tps_cached else None,
        "hidden_cache": args.cache_hidden,
        "final_metrics": {
            "train_loss": round(history.train_loss[-1], 4),
            "held_out_loss": round(val_loss, 4) if val_loss is not None else None,
            "held_out_perplexity": round(math.exp(val_loss), 4) if val_loss is not None else None,
            "base_held_out_loss": round(base_val_loss, 4) if base_val_loss is not None else None,
        },
    }
    # The curve is written with the head, in the same atomic swap: the folder never changes once visible,
    # and its `bytes` (every file in it) are final from the first listing.
    curve = plot_history(history, f"{args.task} ({args.kind})")
    save_head(head, args.out, base.info(), task=args.task, prompt_template=style.template, prompt_format=style.format,
              training=training, extra_files={LOSS_CURVE_NAME: curve})
    return training


def summary(args: argparse.Namespace, training: dict[str, Any]) -> str:
    """What was written, how well and how fast it trained, and the commands that evaluate and serve it."""
    m = training["final_metrics"]
    held_out = (f"held-out loss {m['held_out_loss']} (perplexity {m['held_out_perplexity']}; the base's own head: "
                f"{m['base_held_out_loss']})"
                if m["held_out_loss"] is not None else f"train loss {m['train_loss']} (no held-out rows)")
    speed = f"{training['tokens_per_s_first_epoch']:,.0f} target tokens/s in epoch 1 (base + head)"
    if training["tokens_per_s_cached"] is not None:
        speed += f", {training['tokens_per_s_cached']:,.0f} tokens/s after it (cached hidden states)"
    name = args.out.resolve().name
    return "\n".join([
        f"wrote {args.out}: {args.kind} head for {args.task!r}, {training['steps']} steps in "
        f"{training['wall_time_s']:.0f} s, {held_out}",
        f"  loss curve: {args.out / LOSS_CURVE_NAME}",
        f"  speed: {speed}",
        cli.next_steps([
            cli.command("training.evaluate", "--heads", args.out, "--data", args.data, "--out", f"reports/{name}"),
            cli.command("clients", "register", args.out, "--name", name) + "   # with the server running",
        ]),
    ])


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    if (args.out / CONFIG_NAME).exists():
        log.warning("%s holds a head already: it is replaced when training ends (a server reading it swaps too)",
                    args.out)
    try:
        training = fit(args)
    except KeyboardInterrupt:
        print(f"interrupted: {args.out} was not written (any previous head there is unchanged)", file=sys.stderr)
        raise SystemExit(130) from None
    except (BaseModelError, DataError, HeadError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(summary(args, training))


if __name__ == "__main__":
    main()
