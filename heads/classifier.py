"""The classifier kind: a few label logits from the frozen base's final hidden states, instead of next-token logits.

A sentiment task needs no 49,152-way distribution: a linear map (optionally through one hidden layer) of one
pooled D-wide state gives C label logits, a few thousand parameters on any base. Pooling is the state at the
last real token of the prompt (what a causal base has read the whole text by; "last") or the mean over the
prompt's real tokens ("mean"). The head is saved, validated and loaded like every other kind; it says it is not
`generative`, and asking it for next-token logits (`prepare`, `decode`) is a TypeError naming the kind.

The other way to classify is a *verbalizer*: any generative head (the base's own too) scored only on the first
token of each label word (`verbalizer_ids`), softmaxed over those C tokens. A generative head folder records
its label names and those token ids in its metadata (heads.storage checks them with `check_verbalizer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from heads.registry import HeadModule, positive_int, register_head

POOLINGS = ("last", "mean")
MIN_LABELS, MAX_LABELS = 2, 1000  # a classifier chooses between at least two labels; 1000 bounds config and answer
MAX_LABEL_CHARS = 64  # a label is a name ("very-positive"), shown in answers and reports
MAX_HIDDEN_PER_EMBD = 4  # hidden_dim at most 4 D: wider adds cost, not what one pooled D-wide state can carry



def check_labels(labels: object, name: str = "labels") -> list[str]:
    """The label names, or ValueError naming the first problem: MIN_LABELS..MAX_LABELS distinct, non-empty,
    printable strings of at most MAX_LABEL_CHARS with no surrounding whitespace. The count is checked first,
    so a config listing a million labels costs one len()."""
    if not isinstance(labels, list):
        raise ValueError(f"{name} must be a list of strings, got {type(labels).__name__}")
    if not MIN_LABELS <= len(labels) <= MAX_LABELS:
        raise ValueError(f"{name} must hold {MIN_LABELS} to {MAX_LABELS} names, got {len(labels)}")
    for label in labels:
        if not isinstance(label, str):
            raise ValueError(f"{name} must be strings, got {type(label).__name__}")
        if not label or len(label) > MAX_LABEL_CHARS or label != label.strip() or not label.isprintable():
            raise ValueError(f"{name}: {label[:MAX_LABEL_CHARS]!r} is not a label name (1 to {MAX_LABEL_CHARS} "
                             "printable characters, no surrounding whitespace)")
    if len(set(labels)) != len(labels):
        raise ValueError(f"{name} must be distinct, got {labels}")
    return labels


def check_verbalizer(labels: object, label_token_ids: object, vocab_size: int) -> None:
    """ValueError unless both are absent, or `labels` are label names and `label_token_ids` as many distinct
    token ids in [0, vocab_size): one token per label, so the labels' probabilities are a softmax over them."""
    if labels is None and label_token_ids is None:
        return
    if labels is None or label_token_ids is None:
        raise ValueError("labels and label_token_ids go together: give both or neither")
    names = check_labels(labels)
    if not isinstance(label_token_ids, list) or len(label_token_ids) != len(names):
        raise ValueError(f"label_token_ids must be a list of {len(names)} token ids, one per label")
    for token in label_token_ids:
        if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab_size:
            raise ValueError(f"label_token_ids must be token ids in [0, {vocab_size}), got {token!r}")
    if len(set(label_token_ids)) != len(label_token_ids):
        raise ValueError(f"label_token_ids must be distinct, got {label_token_ids}")


def verbalizer_ids(words: Sequence[str], tokenizer: Any, prompt_format: str) -> list[list[int]]:
    """Each label word's token ids as an answer to a prompt of this format, as training targets them.

    A plain prompt is continued by the word as written (so " positive", with its space); a chat answer is the
    assistant's turn, which starts without one ("positive"). ValueError if a word encodes to nothing or two
    words share their first token: the first token is what a verbalizer scores, so it must tell them apart.
    """
    ids = [list(tokenizer(w.lstrip() if prompt_format == "chat" else w, add_special_tokens=False)["input_ids"])
           for w in words]
    for word, word_ids in zip(words, ids, strict=True):
        if not word_ids:
            raise ValueError(f"label word {word!r} encodes to no tokens")
    firsts = [word_ids[0] for word_ids in ids]
    if len(set(firsts)) != len(firsts):
        shared = sorted({repr(w) for w, f in zip(words, firsts, strict=True) if firsts.count(f) > 1})
        raise ValueError(f"label words {', '.join(shared)} start with the same token, so a verbalizer cannot tell "
                         "them apart under this base's tokenizer; choose words whose first tokens differ")
    return ids


def pool(hidden: Tensor, mask: Tensor | None, pooling: str) -> Tensor:
    """(B, T, D) states and a (B, T) mask of real tokens -> (B, D): the state at each row's last real token, or
    the mean over its real tokens. Padding may be on either side; every row needs one real token."""
    if mask is None:
        return hidden[:, -1] if pooling == "last" else hidden.mean(dim=1)
    if mask.shape != hidden.shape[:2]:
        raise ValueError(f"mask must be {tuple(hidden.shape[:2])}, got {tuple(mask.shape)}")
    real = mask.to(torch.bool)
    counts = real.sum(dim=1)  # (B,)
    if bool((counts == 0).any()):
        raise ValueError("every row needs at least one real token (its mask is all zeros)")
    if pooling == "last":
        positions = torch.arange(1, hidden.shape[1] + 1, device=hidden.device)  # (T,), distinct and increasing
        last = (real * positions).argmax(dim=1)  # (B,) the last real position
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, D)
    summed = (hidden * real.unsqueeze(-1).to(hidden.dtype)).sum(dim=1)  # (B, D)
    return summed / counts.unsqueeze(-1).to(hidden.dtype)


@dataclass
class ClassifierConfig:
    labels: list[str] = field(default_factory=list)  # the label names, in the order of the logits; 2 to 1000
    pooling: str = "last"  # "last": the state at the prompt's last token; "mean": the mean over its tokens
    hidden_dim: int | None = None  # one hidden layer (GELU) of this width; None: a linear map of the pooled state

    def validate(self) -> None:
        """Raise ValueError naming the first bad field; called before any tensor is built."""
        check_labels(self.labels)
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.hidden_dim is not None and not positive_int(self.hidden_dim):
            raise ValueError(f"hidden_dim must be a positive integer or null, got {self.hidden_dim!r}")

    def parameter_count(self, vocab_size: int, n_embd: int) -> int:
        """Weights and biases on a D-wide base; ValueError for a hidden layer past MAX_HIDDEN_PER_EMBD x D.
        Arithmetic only, so an absurd config is refused before any tensor exists."""
        classes = len(self.labels)
        if self.hidden_dim is None:
            return n_embd * classes + classes
        limit = MAX_HIDDEN_PER_EMBD * n_embd
        if self.hidden_dim > limit:
            raise ValueError(f"hidden_dim {self.hidden_dim} is over the bound {limit} "
                             f"({MAX_HIDDEN_PER_EMBD} x n_embd {n_embd})")
        return n_embd * self.hidden_dim + self.hidden_dim + self.hidden_dim * classes + classes


class ClassifierHead(HeadModule):
    head_type = "classifier"
    generative = False  # label logits, not next-token logits: it cannot decode text
    config: ClassifierConfig

    def __init__(self, config: ClassifierConfig | None = None, *, vocab_size: int, n_embd: int) -> None:
        super().__init__()
        config = config or ClassifierConfig()
        self._take_config(config, vocab_size, n_embd)
        classes = len(config.labels)
        # A linear map (the course's "last linear layer"), or one hidden layer with a GELU before it.
        self.hidden = nn.Linear(n_embd, config.hidden_dim) if config.hidden_dim else None
        self.out = nn.Linear(config.hidden_dim or n_embd, classes)
        for lin in (self.hidden, self.out):
            if lin is not None:
                nn.init.normal_(lin.weight, std=lin.in_features ** -0.5)
                nn.init.zeros_(lin.bias)

    @property
    def labels(self) -> list[str]:
        """The label names, in the order of the logits."""
        return list(self.config.labels)

    def pool(self, hidden: Tensor, mask: Tensor | None = None) -> Tensor:
        """(B, T, D) final hidden states, (B, T) mask of real tokens -> (B, D), as the config pools."""
        if hidden.shape[-1] != self.n_embd:
            raise ValueError(f"hidden size must be {self.n_embd}, got {hidden.shape[-1]}")
        return pool(hidden, mask, self.config.pooling)

    def classify(self, pooled: Tensor) -> Tensor:
        """(B, D) pooled states -> (B, C) label logits."""
        x = pooled.to(self.out.weight.dtype)
        if self.hidden is not None:
            x = F.gelu(self.hidden(x))  # (B, H)
        return self.out(x)  # (B, C)

    def forward(self, hidden: Tensor, embeddings: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """(B, T, D) final hidden states (and the mask of real tokens) -> (B, C) label logits; `embeddings` is
        accepted for the shared head interface and unused."""
        return self.classify(self.pool(hidden, mask))

    def _not_generative(self, what: str) -> TypeError:
        return TypeError(f"a head of kind {self.head_type!r} gives label logits, not next-token logits: it cannot "
                         f"{what}; classify with it instead")

    def prepare(self, embeddings: Tensor | None = None) -> None:
        raise self._not_generative("prepare to decode")

    def decode(self, hidden_last: Tensor, base_logits: Tensor | None = None) -> Tensor:
        raise self._not_generative("decode tokens")

    def release(self) -> None:
        """Nothing cached."""


register_head("classifier", ClassifierConfig, ClassifierHead)
