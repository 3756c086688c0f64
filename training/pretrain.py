"""Train the embedded default base: a small GPT-2 and its tokenizer, from scratch, offline.

Why: the hub is unreachable where this project runs, yet the server and the heads need a real
GPT-2-architecture base. The result is an ordinary Hugging Face folder, so swapping in the real
`gpt2` later needs no code change.

    python -m training.pretrain --out models/mini-gpt2   # what `make embedded` runs: 26 minutes on 2 cores
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from heads.folders import staged, swap_in
from training import cli, synth

log = logging.getLogger("training.pretrain")
EOS = "<|endoftext|>"


def held_out_pairs(seed: int, share: float = 0.1) -> set[tuple[int, int]]:
    """Addition pairs (A, B in 0..99) never shown in training; they measure the base."""
    rng = random.Random(f"held-out-pairs:{seed}")
    pairs = [(a, b) for a in range(100) for b in range(100)]
    return set(rng.sample(pairs, int(len(pairs) * share)))


def build_corpus(seed: int, n_arith: int, n_problems: int, held_out: set[tuple[int, int]]) -> list[str]:
    """Whole examples: bare arithmetic lines and word problems with their solutions (train space)."""
    rng = random.Random(f"corpus:{seed}")
    lines = list(synth.arithmetic_lines(rng, n_arith, held_out))
    lines += [f"{r['problem']} {r['generated_solution']}" for r in synth.generate(n_problems, seed, "train")]
    rng.shuffle(lines)
    return lines


def train_tokenizer(lines: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE that keeps every digit its own token, so arithmetic stays learnable."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS,
                                   model_max_length=256)


def pack(examples: list[list[int]], block: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of whole examples (never split across rows), padded; labels -100 on padding."""
    rows: list[list[int]] = []
    current: list[int] = []
    for ex in examples:
        ex = ex[:block]
        if len(current) + len(ex) > block:
            rows.append(current)
            current = []
        current = current + ex
    if current:
        rows.append(current)
    ids = torch.full((len(rows), block), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), block), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor(row)
    return ids, labels


@torch.no_grad()
def addition_accuracy(model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast,
                      pairs: list[tuple[int, int]]) -> float:
    """Greedy completion of `A + B =`; prompts grouped by token length so no padding is needed."""
    model.eval()
    groups: dict[int, list[tuple[list[int], int]]] = {}
    for a, b in pairs:
        ids = tokenizer(f"{a} + {b} =")["input_ids"]
        groups.setdefault(len(ids), []).append((ids, a + b))
    correct = 0
    for items in groups.values():
        ids = torch.tensor([i for i, _ in items])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
        for row, (_, want) in zip(out[:, ids.shape[1]:], items, strict=True):
            text = str(tokenizer.decode(row, skip_special_tokens=True)).strip().split("\n")[0]
            correct += text == str(want)
    return correct / max(1, len(pairs))


@torch.no_grad()
def mean_loss(model: GPT2LMHeadModel, ids: torch.Tensor, labels: torch.Tensor, batch: int = 64) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(ids), batch):
        out = model(input_ids=ids[i: i + batch], labels=labels[i: i + batch])
        n = int((labels[i: i + batch, 1:] != -100).sum())
        total, count = total + out.loss.item() * n, count + n
    return total / max(1, count)


def main(argv: list[str] | None = None) -> None:
    p = cli.parser("training.pretrain", __doc__)
    p.add_argument("--out", type=Path, required=True, help="folder for the base (an ordinary HF model folder)")
    p.add_argument("--seed", type=int, default=0, help="corpus, held-out pairs, initialisation and batches")
    p.add_argument("--steps", type=int, default=2500, help="optimizer steps (the embedded base's)")
    p.add_argument("--batch-size", type=int, default=48, help="rows of --block-size tokens per step")
    p.add_argument("--block-size", type=int, default=128, help="tokens per training row (whole examples packed)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (warm-up, then cosine)")
    p.add_argument("--vocab-size", type=int, default=512, help="byte-level BPE vocabulary, digits one token each")
    p.add_argument("--n-layer", type=int, default=4, help="transformer blocks")
    p.add_argument("--n-embd", type=int, default=128, help="model width")
    p.add_argument("--n-head", type=int, default=4, help="attention heads per block")
    p.add_argument("--arith", type=int, default=120_000, help="bare arithmetic lines in the corpus")
    p.add_argument("--problems", type=int, default=30_000, help="word problems in the corpus")
    p.add_argument("--eval-pairs", type=int, default=1000, help="held-out addition pairs to score")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    started = time.time()

    held_out = held_out_pairs(args.seed)
    lines = build_corpus(args.seed, args.arith, args.problems, held_out)
    tokenizer = train_tokenizer(lines, args.vocab_size)
    eos = tokenizer.eos_token_id
    encoded = [ids + [eos] for ids in tokenizer(lines)["input_ids"]]
    ids, labels = pack(encoded, args.block_size, eos)
    test_rows = synth.generate(500, args.seed, "test")
    test_ids, test_labels = pack([x + [eos] for x in tokenizer(
        [f"{r['problem']} {r['generated_solution']}" for r in test_rows])["input_ids"]], args.block_size, eos)
    log.info("corpus: %d examples, %d rows of %d tokens, vocab %d", len(lines), len(ids), args.block_size,
             len(tokenizer))

    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256,  # matches the tokenizer's model_max_length
                        n_embd=args.n_embd, n_layer=args.n_layer,
                        n_head=args.n_head, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                        tie_word_embeddings=True, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters", n_params / 1e6)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / args.steps))))
    gen = torch.Generator().manual_seed(args.seed)
    loss_value = float("nan")
    for step in range(args.steps):
        model.train()
        idx = torch.randint(0, len(ids), (args.batch_size,), generator=gen)
        loss = model(input_ids=ids[idx], labels=labels[idx]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_value = loss.item()
        if step % 100 == 0 or step == args.steps - 1:
            log.info("step %d/%d loss %.4f (%.0fs)", step, args.steps, loss_value, time.time() - started)

    pairs = sorted(held_out)[: args.eval_pairs]
    accuracy = addition_accuracy(model, tokenizer, pairs)
    test_loss = mean_loss(model, test_ids, test_labels)
    wall = time.time() - started
    log.info("held-out addition accuracy %.4f on %d pairs; test-problem loss %.4f; %.0fs", accuracy, len(pairs),
             test_loss, wall)

    provenance = {
        "command": "python -m training.pretrain " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "block_size": args.block_size,
        "lr": args.lr, "parameters": n_params, "torch_version": torch.__version__,
        "threads": torch.get_num_threads(), "wall_time_s": round(wall, 1),
        "data": {"arithmetic_lines": args.arith, "word_problems": args.problems, "examples": len(lines),
                 "rows": len(ids), "source": "training.synth train space + training.synth.arithmetic_lines",
                 "held_out_addition_pairs": len(held_out)},
        "final_train_loss": round(loss_value, 4),
        "held_out": {"addition_accuracy": round(accuracy, 4), "addition_pairs_scored": len(pairs),
                     "test_problem_loss": round(test_loss, 4)},
    }
    write_base(args.out, model, tokenizer, provenance)
    print(json.dumps(provenance["held_out"]))
    print(f"wrote {args.out} ({n_params / 1e6:.2f}M parameters, {wall / 60:.0f} min): held-out `A + B =` accuracy "
          f"{accuracy:.3f} on {len(pairs)} pairs; provenance in {args.out / 'provenance.json'}")
    print(cli.next_steps([cli.command("training.synth", "--out", "data/my-math", "--train", 2000, "--test", 200),
                          cli.command("training.fit", "--base", args.out, "--data", "data/my-math", "--task", "math",
                                      "--out", "runs/my-math")]))


def write_base(out: Path, model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast,
               provenance: dict[str, object]) -> None:
    """Write the whole base folder aside, then swap it in with one rename (`heads.folders`, as heads are):
    the previous base stays until the new one replaces it, and a failure or Ctrl-C on the way leaves it
    as it was, with no temporary folder behind."""
    with staged(out, "tmp") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "provenance.json").write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
        swap_in(tmp, out)


if __name__ == "__main__":
    main()
