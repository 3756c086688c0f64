"""One decode step's next-token logits for every head in the batch, with one shared LM-head product.

Shared by the server's engine (server/next_tokens.py) and the offline decode loop evaluation runs
(runtime/batch_decode.py), so both turn hidden states into logits the same way. The base's LM head
runs once for the whole step, over the hidden states of every row that needs the base's logits (its
own rows, residual or "probs" heads) stacked with the projections of every factored head's rows
(heads/factored.py): one V x D product however many heads are in the batch. Each materialised head
then decodes its own group once.

A head that raises (in its projection or its decode) spoils only its own group: that group gets the
exception in place of logits and every other group decodes on. Only the shared product itself, the
base's own LM head, can fail the whole step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from heads.base import Base
from heads.factored import FactoredHead, ServingHead

Head = ServingHead | None  # None: the base's own linear LM head


def needs_base_logits(head: Head) -> bool:
    """The base's own rows and residual (or "probs") heads use the base's logits of their rows."""
    return head is None or head.accepts_base_logits


def group_logits(base: Base, hidden: Tensor, heads: Sequence[Head],
                 groups: list[list[int]]) -> list[tuple[list[int], Tensor | Exception]]:
    """(rows, (n, V) float32 logits, or the exception its head raised) per group; `heads[row]` is the head
    of each row of `hidden` (N, D), and every group's rows share one head."""
    device = hidden.device

    def pick(rows: list[int]) -> Tensor:
        return hidden if len(rows) == len(heads) else hidden[torch.tensor(rows, device=device)]

    # Rows in no group (their job already failed this step) cost nothing.
    z_rows = sorted(row for rows in groups if needs_base_logits(heads[rows[0]]) for row in rows)
    stacked = [pick(z_rows)] if z_rows else []
    offsets: dict[int, int] = {}  # group index -> first stacked row of its projections
    failed: dict[int, Exception] = {}  # group index -> what its head raised
    start = len(z_rows)
    for g, rows in enumerate(groups):
        head = heads[rows[0]]
        if isinstance(head, FactoredHead):
            try:
                stacked.append(head.project(pick(rows)).to(hidden.dtype))
            except Exception as e:  # this head's rows only
                failed[g] = e
                continue
            offsets[g], start = start, start + len(rows)
    shared = base.linear_logits(torch.cat(stacked)) if stacked else None  # (z rows + projections, V)
    position = {row: i for i, row in enumerate(z_rows)}

    def base_logits(rows: list[int]) -> Tensor:
        assert shared is not None
        picked = [position[row] for row in rows]
        if picked == list(range(len(picked))) and len(picked) == len(z_rows):
            return shared[: len(picked)]
        return shared[torch.tensor(picked, device=device)]

    out: list[tuple[list[int], Tensor | Exception]] = []
    for g, rows in enumerate(groups):
        if g in failed:
            out.append((rows, failed[g]))
            continue
        head = heads[rows[0]]
        try:
            if head is None:
                logits = base_logits(rows)
            elif isinstance(head, FactoredHead):
                assert shared is not None  # it holds this group's projections
                projected = shared[offsets[g]: offsets[g] + len(rows)]
                logits = head.combine(projected, base_logits(rows) if head.accepts_base_logits else None)
            elif head.accepts_base_logits:
                logits = head.decode(pick(rows), base_logits=base_logits(rows))
            else:
                logits = head.decode(pick(rows))
            if tuple(logits.shape) != (len(rows), base.vocab_size):
                raise ValueError(f"logits of shape {tuple(logits.shape)}, expected {(len(rows), base.vocab_size)}")
            out.append((rows, logits.float()))
        except Exception as e:  # a head that raises (or returns garbage) spoils its own group alone
            if head is None:
                raise  # the base's own LM head: nobody in the step can decode
            out.append((rows, e))
    return out
