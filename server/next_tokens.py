"""One engine step's draws: from the step's hidden states to one new token per sequence.

Each head's group gets its logits once (runtime/head_logits.py); its greedy rows share one argmax
and every sampling row draws with its own generator. Whatever goes wrong here belongs to one
sequence or one head's group — a head that raises, logits that are NaN or infinite (or overflow at
the sequence's temperature), a stop string or detokenisation that fails — so it is caught there and
handed to `fail` with the error its client should read; every other row is drawn exactly as if the
failing one had never been in the batch. No check loops over vocabulary-sized rows in Python: the
finiteness test is one vectorised pass inside `sample`, per group for greedy rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

from heads.base import Base
from heads.sampling import NonFiniteLogitsError, SamplingParams, sample, scaled_logits
from runtime.head_logits import group_logits
from server.errors import GenerationFailedError, HeadOutputError
from server.sequence import Detokenizer, Sequence

log = logging.getLogger(__name__)

GREEDY = SamplingParams()
Fail = Callable[[Sequence, Exception], None]  # ends the sequence's job with the error its client reads


def draw_tokens(base: Base, hidden: Tensor, batch: list[Sequence], groups: list[list[int]], now: float,
                alive: Callable[[Sequence], bool], fail: Fail) -> dict[int, Tensor]:
    """Append one token to every sequence in `groups` (rows of `batch` and `hidden` (N, D), one head each)
    that is still `alive` when its turn comes; `fail` the ones whose own work fails. A beam draws nothing
    here: its (V,) logits come back by row, for its job's beam search (server/beams.py)."""
    tokenizer, eos_id = base.tokenizer, base.tokenizer.eos_token_id
    heads = [seq.head for seq in batch]
    beam_logits: dict[int, Tensor] = {}
    for rows, logits in group_logits(base, hidden, heads, groups):
        seqs = [batch[row] for row in rows]
        if isinstance(logits, Exception):
            log.error("head %r raised while decoding: %r", seqs[0].head_label, logits)
            for seq in seqs:
                fail(seq, HeadOutputError(f"head {seq.head_label!r} cannot be served: its decode raised "
                                          f"{type(logits).__name__}"))
            continue
        _draw_greedy(logits, seqs, now, alive, fail, tokenizer, eos_id)
        beam_logits.update((row, logits[i]) for i, (row, seq) in enumerate(zip(rows, seqs, strict=True))
                           if seq.params.is_beam and alive(seq))
        for i, seq in enumerate(seqs):
            if not seq.params.is_greedy and not seq.params.is_beam and alive(seq):
                try:
                    token, logprob = sample(logits[i:i + 1], seq.params, seq.generator)
                    seq.append(int(token), float(logprob), now, tokenizer, eos_id)
                except Exception as e:
                    fail(seq, public_error(seq, e))
        for i, seq in enumerate(seqs):
            if seq.top_logprobs and not seq.params.is_beam and alive(seq):
                try:  # from the distribution the token's own logprob comes from
                    top = F.log_softmax(scaled_logits(logits[i:i + 1], seq.params), dim=-1)[0].topk(seq.top_logprobs)
                    seq.add_top(top.indices.tolist(), top.values.tolist())
                except Exception as e:
                    fail(seq, public_error(seq, e))
    return beam_logits


def _draw_greedy(logits: Tensor, seqs: list[Sequence], now: float, alive: Callable[[Sequence], bool], fail: Fail,
                 tokenizer: Detokenizer, eos_id: int | None) -> None:
    """One argmax for the group's greedy rows: row-wise, so the same as one row at a time."""
    picked = [i for i, seq in enumerate(seqs) if seq.params.is_greedy and alive(seq)]
    while picked:
        try:
            ids, logprobs = sample(logits[picked] if len(picked) < len(seqs) else logits, GREEDY)
            break
        except NonFiniteLogitsError as e:  # fail those rows, draw for the rest
            bad = {picked[j] for j in e.rows}
            for i in bad:
                fail(seqs[i], public_error(seqs[i], e))
            picked = [i for i in picked if i not in bad]
        except Exception as e:
            for i in picked:
                fail(seqs[i], public_error(seqs[i], e))
            return
    else:
        return
    for i, token, logprob in zip(picked, ids.tolist(), logprobs.tolist(), strict=True):
        try:
            seqs[i].append(token, logprob, now, tokenizer, eos_id)
        except Exception as e:
            fail(seqs[i], public_error(seqs[i], e))


def public_error(seq: Sequence, error: Exception) -> Exception:
    """What one sequence's own failure tells its client: its head's fault (409), or ours (500)."""
    if isinstance(error, NonFiniteLogitsError) and seq.head is None:  # the base's own logits: not the client's head
        log.error("the base's own logits are not finite", exc_info=error)
        return GenerationFailedError("the base model produced non-finite logits, so no token can be drawn")
    if isinstance(error, NonFiniteLogitsError):
        return HeadOutputError(f"head {seq.head_label!r} cannot be served: it produced non-finite logits (NaN or "
                               f"infinity), so no token can be drawn")
    log.error("a sequence of head %r failed", seq.head_label, exc_info=error)
    return GenerationFailedError(f"decoding this request failed ({type(error).__name__}); other requests were "
                                 f"not affected")
