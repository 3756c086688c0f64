"""Train a classifier head (`python -m training.fit --kind classifier --data ../shared/data/sst --task sentiment`).

A classifier reads one pooled D-wide state per text, and the base is frozen, so the base runs once over the
texts (`pooled_features`: length-sorted batches, both poolings kept, D floats each, cached on disk by the
base's fingerprint and the exact prompt ids) and every epoch after that costs microseconds. The features are
standardised for training (mean 0, variance 1 per dimension, from the training rows) and the standardisation
is folded into the head's first layer before it is saved, so the head reads raw states as the server gives them.
Cross-entropy is weighted by inverse class frequency unless `--no-class-weights`; the held-out share of the
training rows (seeded) picks the epoch whose head is kept (lowest held-out loss). Same seed, same bytes.

Generative heads trained as verbalizers (`--label-words`) take training.fit's own path (training.classify_data).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from heads import ClassifierConfig, ClassifierHead, save_head
from heads.base import Base, default_base, load_base
from heads.base_sources import default_cache_dir
from heads.classifier import POOLINGS, pool
from heads.prompts import training_style
from training import cli
from training.classify_data import CLASSIFY_TEMPLATE, encode_prompts, label_names, load_labelled
from training.classify_metrics import scores
from training.data import DataError
from training.distributed import Ranks
from training.hidden_cache import PASS_TOKENS

log = logging.getLogger("training.fit")
FEATURES_DIR = "pooled"  # under the cache root, beside training/hidden_cache.py's "hidden"
FORMAT = 1  # bump when the file's layout changes: a new key, so an old pass is never misread
CLASSIFIER_EPOCHS = 20  # passes over cached features cost milliseconds; the held-out loss picks the epoch kept
CLASSIFIER_LR = 1e-3
WEIGHT_DECAY = 0.01  # on standardised features: a mild pull toward the uniform answer


def add_arguments(p: argparse.ArgumentParser) -> None:
    """training.fit's classification flags: a classifier's, and the label words that make a verbalizer."""
    g = p.add_argument_group("classification (--kind classifier; or a generative kind with --label-words)")
    g.add_argument("--labels", default=None, help="label names in label order, comma-separated (default: the label "
                   "words stripped, else label_0, label_1 ... up to the data's largest label)")
    g.add_argument("--label-words", default=None, help="train a generative head to answer each text with its "
                   "label's word (comma-separated, in label order, e.g. ' terrible, bad, okay, good, excellent'; "
                   "their first tokens must differ): a verbalizer, recording the labels and those first tokens")
    g.add_argument("--pooling", choices=POOLINGS, default=None, help="classifier: the state at the prompt's last "
                   "token, or the mean over its tokens (default: last)")
    g.add_argument("--hidden-dim", type=int, default=None, help="classifier: one hidden layer (GELU) of this width "
                   "(default: none, a linear map)")
    g.add_argument("--class-weights", action=argparse.BooleanOptionalAction, default=None, help="classifier: "
                   "weight the cross-entropy by inverse class frequency (default: on)")


def resolve(args: argparse.Namespace, p: argparse.ArgumentParser) -> argparse.Namespace:
    """Per-kind defaults, and flags that do not fit the kind refused by name."""
    classifier = args.kind == "classifier"
    if classifier and args.label_words is not None:
        p.error("--label-words trains a generative kind as a verbalizer; a classifier takes --labels")
    if not classifier:
        for flag in ("pooling", "hidden_dim", "class_weights"):
            if getattr(args, flag) is not None:
                p.error(f"--{flag.replace('_', '-')} is for --kind classifier")
        if args.labels is not None and args.label_words is None:
            p.error("--labels names a classifier's labels, or a verbalizer's with --label-words")
    if classifier or args.label_words is not None:
        args.prompt_template = args.prompt_template or CLASSIFY_TEMPLATE
    if classifier:
        if args.hidden_dim is not None and args.hidden_dim < 1:
            p.error("--hidden-dim must be >= 1")
        args.pooling = args.pooling or "last"
        args.class_weights = True if args.class_weights is None else args.class_weights
        args.lr = args.lr or CLASSIFIER_LR
    if args.epochs is None:
        args.epochs = CLASSIFIER_EPOCHS if classifier else 3
    return args


@dataclass
class Features:
    pooled: np.ndarray  # (N, 2, D) float32: per prompt, the last real token's state and the mean state
    pass_seconds: float  # what the base's pass cost (0.0 when read from disk)
    pass_tokens: int
    from_disk: bool

    def of(self, pooling: str) -> np.ndarray:
        return self.pooled[:, POOLINGS.index(pooling)]  # (N, D)

    def stats(self) -> dict[str, Any]:
        return {"examples": len(self.pooled), "pass_tokens": self.pass_tokens,
                "pass_seconds": round(self.pass_seconds, 2), "from_disk": self.from_disk,
                "pass_tokens_per_s": round(self.pass_tokens / self.pass_seconds, 1) if self.pass_seconds else None}


def features_key(base: Base, prompts: list[list[int]]) -> str:
    digest = hashlib.sha256(f"{FORMAT}\0{base.fingerprint}\0{len(prompts)}".encode())
    for ids in prompts:
        digest.update(np.asarray([len(ids), *ids], dtype=np.int64).tobytes())
    return digest.hexdigest()[:32]


@torch.no_grad()
def compute_features(base: Base, prompts: list[list[int]], desc: str = "base pass") -> Features:
    """Run the base once over the prompts, in length-sorted batches of about PASS_TOKENS tokens (little padding)."""
    pooled = np.zeros((len(prompts), len(POOLINGS), base.n_embd), dtype=np.float32)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pad = base.tokenizer.pad_token_id if base.tokenizer.pad_token_id is not None else (base.tokenizer.eos_token_id or 0)
    total = sum(len(ids) for ids in prompts)
    started = time.perf_counter()
    bar = tqdm(total=total, desc=desc, unit="tok", unit_scale=True, file=sys.stderr, dynamic_ncols=True)
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end - start + 1) * len(prompts[order[end]]) <= PASS_TOKENS:
            end += 1
        batch = order[start:end]
        width = len(prompts[batch[-1]])  # the longest of the batch (sorted)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):  # right padding: positions count from 0 for every row
            ids[row, : len(prompts[i])] = torch.tensor(prompts[i])
            mask[row, : len(prompts[i])] = 1
        hidden = base.hidden_states(ids.to(base.device), attention_mask=mask.to(base.device)).last_hidden_state
        mask = mask.to(hidden.device)
        for k, pooling in enumerate(POOLINGS):
            pooled[batch, k] = pool(hidden.float(), mask, pooling).cpu().numpy()
        bar.update(int(mask.sum()))
        start = end
    bar.close()
    if not np.isfinite(pooled).all():
        raise ValueError("the base's pooled hidden states are not finite")
    return Features(pooled, time.perf_counter() - started, total, from_disk=False)


def pooled_features(base: Base, prompts: list[list[int]], *, use_disk: bool = True, cache_dir: Path | None = None,
                    desc: str = "base pass") -> Features:
    """The prompts' pooled states, from an earlier pass on disk when one matches, else computed (and kept)."""
    if not use_disk:
        return compute_features(base, prompts, desc)
    path = (cache_dir or default_cache_dir()).expanduser() / FEATURES_DIR / f"{features_key(base, prompts)}.npy"
    try:
        pooled = np.load(path, allow_pickle=False)
        if pooled.shape == (len(prompts), len(POOLINGS), base.n_embd) and pooled.dtype == np.float32:
            log.info("%s: read %d pooled states from %s (no base pass)", desc, len(prompts), path)
            return Features(pooled, 0.0, sum(len(ids) for ids in prompts), from_disk=True)
    except (OSError, ValueError):
        pass
    features = compute_features(base, prompts, desc)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.save(f, features.pooled)
        os.replace(tmp, path)
    except OSError as e:  # a cache that cannot be written costs the next run a pass, nothing else
        log.warning("could not keep the pooled states in %s: %s", path, e)
        tmp.unlink(missing_ok=True)
    return features


def class_weights(labels: Tensor, classes: int) -> Tensor:
    """Inverse class frequency, n / (C n_c) over the C labels that occur, so the weighted mean over the rows is 1
    (scikit-learn's "balanced"); a label absent from the rows gets 0."""
    counts = torch.bincount(labels, minlength=classes).double()
    present = int((counts > 0).sum())
    weights = torch.where(counts > 0, len(labels) / (present * counts.clamp(min=1)), torch.zeros_like(counts))
    return weights.float()


@torch.no_grad()
def fold_standardisation(head: ClassifierHead, mean: Tensor, std: Tensor) -> None:
    """Make the head trained on (x - mean) / std read x itself: W' = W / std, b' = b - W' mean (in float64)."""
    first = head.hidden if head.hidden is not None else head.out
    weight = first.weight.double() / std.double()  # (out, D)
    first.bias.copy_((first.bias.double() - weight @ mean.double()).float())
    first.weight.copy_(weight.float())


def train(x: Tensor, y: Tensor, x_val: Tensor, y_val: Tensor, head: ClassifierHead, args: argparse.Namespace,
          weights: Tensor | None) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """AdamW over minibatches of standardised features; keeps the epoch with the lowest held-out loss (the last
    without held-out rows). Returns the record and the curves."""
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = math.ceil(len(y) / args.batch_size)
    total = min(args.max_steps or 10**12, steps_per_epoch * args.epochs)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    order = torch.Generator().manual_seed(args.seed)
    curves: dict[str, list[float]] = {"step": [], "train_loss": [], "eval_step": [], "held_out_loss": [],
                                      "held_out_accuracy": []}
    best: tuple[float, int, dict[str, Tensor]] | None = None
    step, epoch = 0, 0
    while step < total:
        head.train()
        for batch in torch.randperm(len(y), generator=order).split(args.batch_size):
            if step >= total:
                break
            loss = F.cross_entropy(head.classify(x[batch]), y[batch], weight=weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            curves["step"].append(step)
            curves["train_loss"].append(float(loss.detach()))
        epoch += 1
        head.eval()
        if len(y_val):
            with torch.no_grad():
                logits = head.classify(x_val)
                held_out = float(F.cross_entropy(logits, y_val, weight=weights))
            curves["eval_step"].append(step)
            curves["held_out_loss"].append(held_out)
            curves["held_out_accuracy"].append(float((logits.argmax(-1) == y_val).float().mean()))
            if best is None or held_out < best[0]:
                best = (held_out, epoch, {k: v.clone() for k, v in head.state_dict().items()})
    if best is not None:
        head.load_state_dict(best[2])
    record = {"steps": step, "epochs_run": epoch, "kept_epoch": best[1] if best is not None else epoch}
    return record, curves


def fit(args: argparse.Namespace, ranks: Ranks | None = None) -> dict[str, Any]:
    """Pool the base's states over the texts once, train the classifier on them, write the head."""
    from training.fit import LOSS_CURVE_NAME  # training.fit imports this module: import its name at run time

    if ranks is not None and ranks.world > 1:
        raise ValueError("a classifier trains on cached features in seconds: run it as one process, not torchrun")
    started = time.time()
    torch.manual_seed(args.seed)
    base = load_base(args.base or default_base(), device=args.device)
    names_from = None if args.labels is not None else load_labelled(args.data, "train", limit=args.limit)[0]
    names = label_names(args.labels, names_from or [])
    rows, stats = load_labelled(args.data, "train", limit=args.limit, num_labels=len(names))
    if stats.skipped:
        log.warning("skipped %d of %d rows: %s", sum(stats.skipped.values()), stats.rows, stats.skipped)
    if len(rows) < 2:
        raise DataError(f"{args.data}: {len(rows)} usable training rows ({stats.rows} read, skipped {stats.skipped})")
    random.Random(args.seed).shuffle(rows)
    style = training_style(base.tokenizer, args.prompt_format, args.prompt_template)
    max_len = min(args.max_len or base.n_positions, base.n_positions)
    prompts, truncated = encode_prompts([r.text for r in rows], base.tokenizer, max_len, style)
    features = pooled_features(base, prompts, use_disk=args.cache_hidden, desc="base pass (texts)")
    x_all = torch.from_numpy(np.ascontiguousarray(features.of(args.pooling)))  # (N, D) float32, on the CPU
    y_all = torch.tensor([r.label for r in rows])
    n_val = int(len(rows) * args.val_fraction)
    x, y, x_val, y_val = x_all[n_val:], y_all[n_val:], x_all[:n_val], y_all[:n_val]
    mean, std = x.double().mean(0), x.double().std(0, correction=0).clamp(min=1e-6)

    def standardise(t: Tensor) -> Tensor:
        return ((t.double() - mean) / std).float()

    head = ClassifierHead(ClassifierConfig(labels=names, pooling=args.pooling, hidden_dim=args.hidden_dim),
                          vocab_size=base.vocab_size, n_embd=base.n_embd)
    weights = class_weights(y, len(names)) if args.class_weights else None
    record, curves = train(standardise(x), y, standardise(x_val), y_val, head, args, weights)
    fold_standardisation(head, mean, std)
    head.eval()
    with torch.no_grad():
        predicted = head.classify(x_val).argmax(-1).tolist() if n_val else []
    held_out = scores(predicted, y_val.tolist(), len(names)) if n_val else None
    counts = torch.bincount(y, minlength=len(names)).tolist()
    training = {
        "data": str(args.data), "examples": len(y), "held_out_examples": n_val, "rows_read": stats.rows,
        "rows_skipped": stats.skipped, "truncated": truncated, "epochs": args.epochs, **record,
        "batch_size": args.batch_size, "lr": args.lr, "weight_decay": WEIGHT_DECAY, "seed": args.seed,
        "parameters": sum(p.numel() for p in head.parameters()), "pooling": args.pooling,
        "hidden_dim": args.hidden_dim, "class_counts": dict(zip(names, counts, strict=True)),
        "class_weights": dict(zip(names, [round(float(w), 4) for w in weights], strict=True))
        if weights is not None else None,
        "feature_pass": features.stats(), "wall_time_s": round(time.time() - started, 2),
        "final_metrics": {
            "train_loss": round(curves["train_loss"][-1], 4) if curves["train_loss"] else None,
            "held_out_loss": round(min(curves["held_out_loss"]), 4) if curves["held_out_loss"] else None,
            "held_out_accuracy": round(held_out.accuracy, 4) if held_out else None,
            "held_out_macro_f1": round(held_out.macro_f1, 4) if held_out else None,
            "held_out_majority_accuracy": round(max(np.bincount(y_val.numpy(), minlength=len(names))) / n_val, 4)
            if n_val else None,
        },
    }
    save_head(head, args.out, base.info(), task=args.task, prompt_template=style.template,
              prompt_format=style.format, training=training,
              extra_files={LOSS_CURVE_NAME: plot_curves(curves, f"{args.task} (classifier, {args.pooling})")})
    return training


def plot_curves(curves: dict[str, list[float]], title: str) -> bytes:
    """Train and held-out loss per step, and held-out accuracy per epoch on a second axis, as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(curves["step"], curves["train_loss"], label="train loss", linewidth=1)
    if curves["eval_step"]:
        ax.plot(curves["eval_step"], curves["held_out_loss"], "o-", label="held-out loss")
        acc = ax.twinx()
        acc.plot(curves["eval_step"], curves["held_out_accuracy"], "s--", color="tab:green", label="held-out acc")
        acc.set_ylabel("held-out accuracy")
        acc.set_ylim(0, 1)
    ax.set(xlabel="step", ylabel="cross-entropy (nats)", title=title)
    handles = [line for axis in fig.axes for line in axis.get_lines()]
    ax.legend(handles=handles, loc="center right", fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    return png.getvalue()


def summary(args: argparse.Namespace, training: dict[str, Any]) -> str:
    """What was written, how well it does on the held-out rows, and what to run next."""
    m, fp = training["final_metrics"], training["feature_pass"]
    held_out = (f"held-out accuracy {m['held_out_accuracy']} (macro-F1 {m['held_out_macro_f1']}; the majority "
                f"label: {m['held_out_majority_accuracy']})" if m["held_out_accuracy"] is not None
                else f"train loss {m['train_loss']} (no held-out rows)")
    base_pass = "read from an earlier pass" if fp["from_disk"] else \
        f"{fp['pass_tokens']:,} tokens in {fp['pass_seconds']:.0f} s ({fp['pass_tokens_per_s']:,.0f} tok/s)"
    weights = training["class_weights"]
    name = args.out.resolve().name
    return "\n".join([
        f"wrote {args.out}: classifier head for {args.task!r} ({len(training['class_counts'])} labels, "
        f"{args.pooling} pooling), {training['steps']} steps (kept epoch {training['kept_epoch']}) in "
        f"{training['wall_time_s']:.0f} s, {held_out}",
        f"  class counts {training['class_counts']}; class weights "
        f"{weights if weights is not None else 'off (--no-class-weights)'}",
        f"  base pass {base_pass}",
        cli.next_steps([
            cli.command("training.evaluate", "--heads", args.out, "--data", args.data, "--out", f"reports/{name}"),
            cli.command("clients", "register", args.out, "--name", name) + "   # with the server running",
        ]),
    ])
