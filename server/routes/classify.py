"""POST /classify: validate at the edge, queue one engine job per text, answer once every text is scored.

Everything a client controls is checked before the server pays for it, in this order: the body's bounds
(schema), the number of texts (MAX_CLASSIFY_TEXTS), the head (404/409) and whether it can classify as asked
(422), the label words (422 unless their first tokens differ), each prompt's size once formatted with the head's
template (422), and only then is the head loaded and are the jobs queued (429 if the queue is full). The texts
of one request run in the same engine steps as everything else; the first text that fails fails the request.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import APIRouter, Body, Request
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive

from heads import HeadMetadata
from heads.classifier import ClassifierHead, verbalizer_ids
from heads.prompts import PromptStyle, base_style, encode
from heads.registry import get_head_type
from server.classify import Classifier, ClassifyJob, ClassifyResult, Scorer, Verbalizer
from server.classify_schemas import (
    REQUEST_EXAMPLES,
    RESPONSE_EXAMPLE,
    Classification,
    ClassifyRequest,
    ClassifyResponse,
    ClassifyTimings,
    LabelProbability,
)
from server.engine import Engine
from server.errors import HeadKindError, HeadUnavailableError, InvalidRequestError
from server.head_cache import LoadedHead
from server.jobs import REPLAN_TRIES, check_prompt_chars, format_prompt, prepare_head
from server.schemas import BASE_LABEL
from server.sequence import JobResult, Pending, Settle
from server.state import RegistryDep, Runtime, RuntimeDep, SettingsDep, label_head
from server.streaming import unless_disconnected

router = APIRouter(tags=["classify"])


@dataclass(frozen=True)
class Plan:
    """How a request's texts are scored, decided from the head's metadata before anything is loaded."""

    method: Literal["classifier", "verbalizer"]
    style: PromptStyle  # the head's prompt template and format, as it was trained
    labels: tuple[str, ...] = ()  # verbalizer; a classifier's come from the loaded head
    token_ids: tuple[int, ...] = ()  # verbalizer: the first token of each label word


@router.post("/classify", response_model=ClassifyResponse,
             responses={200: {"content": {"application/json": {"example": RESPONSE_EXAMPLE}}}})
async def classify(body: Annotated[ClassifyRequest, Body(openapi_examples=REQUEST_EXAMPLES)], request: Request,
                   runtime: RuntimeDep, registry: RegistryDep, settings: SettingsDep) -> ClassifyResponse:
    """Label probabilities for each text, with a classifier head, or a generative head (or the base) scored on
    label words' first tokens; results in the request's order, probabilities in label order."""
    texts = body.all_texts()
    if len(texts) > settings.max_classify_texts:
        raise InvalidRequestError(f"{len(texts)} texts in one request; this server takes at most "
                                  f"{settings.max_classify_texts} (MAX_CLASSIFY_TEXTS)")
    label_head(request, registry, body.head)  # 404 here for a head the registry does not hold
    meta = registry.metadata(body.head) if body.head is not None else None
    # Planned and formatted from the metadata before the head is loaded (bad texts cost no load); if the head was
    # replaced in between, the version loaded decides: planned again from its metadata.
    for _ in range(REPLAN_TRIES):
        plan = plan_for(body, meta, runtime)
        prompts, prompt_ids, truncated = await _prompts(texts, plan.style, body.head, runtime, body.truncate)
        loaded = await prepare_head(body.head, runtime) if body.head is not None else None
        if loaded is None or _plans_alike(loaded.meta, meta):
            break
        meta = loaded.meta
    else:
        raise HeadUnavailableError(f"head {body.head!r} is being replaced too often to serve; send the request again")
    scorer = _scorer(plan, body.head, loaded)
    label = body.head or BASE_LABEL
    jobs = [ClassifyJob(prompt_ids=ids, head_label=label, scorer=scorer) for ids in prompt_ids]
    results = await classify_all(runtime.engine, jobs, request.receive)
    return ClassifyResponse(
        head=body.head, method=plan.method, labels=list(scorer.labels),
        label_token_ids=list(scorer.token_ids) if isinstance(scorer, Verbalizer) else None,
        results=[_classification(scorer.labels, result, prompt, len(ids), cut)
                 for result, prompt, ids, cut in zip(results, prompts, prompt_ids, truncated, strict=True)])


def plan_for(body: ClassifyRequest, meta: HeadMetadata | None, runtime: Runtime) -> Plan:
    """Whether and how the head (None: the base) can classify (422 naming the problem), from its metadata alone."""
    tokenizer = runtime.base.tokenizer
    style = meta.prompt_style if meta is not None else base_style(tokenizer)
    if meta is not None and not get_head_type(meta.head_type).generative:
        if body.label_words is not None:
            raise HeadKindError(f"head {body.head!r} is a {meta.head_type} head with labels of its own; label_words "
                                "are for generative heads (or the base): leave them out")
        return Plan("classifier", style)
    if body.label_words is not None:
        try:
            ids = verbalizer_ids(body.label_words, tokenizer, style.format)
        except ValueError as e:
            raise InvalidRequestError(str(e)) from None
        return Plan("verbalizer", style, tuple(body.label_words), tuple(word[0] for word in ids))
    if meta is not None and meta.labels is not None and meta.label_token_ids is not None:
        return Plan("verbalizer", style, tuple(meta.labels), tuple(meta.label_token_ids))
    if meta is None:
        raise HeadKindError("the base's own LM head classifies only by label words: send label_words (at least two, "
                            "e.g. [\" positive\", \" negative\"]) or name a classifier head")
    raise HeadKindError(f"head {body.head!r} is a {meta.head_type} head that records no labels, so it can classify "
                        "only by label words: send label_words (at least two)")


async def _prompts(texts: list[str], style: PromptStyle, head: str | None, runtime: Runtime,
                   truncate: bool) -> tuple[list[str], list[list[int]], list[bool]]:
    """Each text formatted as the head was trained (bounded before it is built) and tokenised off the loop.

    With `truncate`, a prompt past the token limit keeps its last tokens, as training.fit cuts training texts.
    Its text is first cut to the last characters those tokens could span (twice over, so that the cut, which
    may split a word, lies in tokens that are dropped), so a huge text costs no more to tokenise than a long one."""
    limit, formatted = runtime.prompt_token_limit, []
    hint = " (send truncate: true to keep its last tokens)"
    for i, text in enumerate(texts):
        where = f"text {i}" if len(texts) > 1 else "the text"
        if truncate:
            text = text[-2 * runtime.prompt_char_limit:]
        else:
            check_prompt_chars(style.filled_length(len(text)), runtime, where, hint)
        prompt, _ = format_prompt(text, style, head, runtime, bounded=False)
        if not truncate:  # a chat template's own text counts too
            check_prompt_chars(len(prompt), runtime, where, hint)
        formatted.append(prompt)
    tokenizer = runtime.base.tokenizer
    ids = await run_in_threadpool(lambda: [encode(p, tokenizer, style.format) for p in formatted])
    truncated = [False] * len(ids)
    for i, prompt_ids in enumerate(ids):
        where = f"text {i}" if len(ids) > 1 else "the text"
        if not prompt_ids:
            raise InvalidRequestError(f"{where} encodes to no tokens")
        if len(prompt_ids) > limit:
            if not truncate:
                raise InvalidRequestError(f"{where} is {len(prompt_ids)} tokens once formatted; the limit is {limit}"
                                          f"{hint}")
            ids[i], truncated[i] = prompt_ids[-limit:], True
            formatted[i] = tokenizer.decode(ids[i])
    return formatted, ids, truncated


def _plans_alike(loaded: HeadMetadata, planned: HeadMetadata | None) -> bool:
    """Whether the version loaded is scored and formatted as the plan assumed (a replace may change any of it)."""
    return planned is not None and all(getattr(loaded, name) == getattr(planned, name) for name in
                                       ("head_type", "prompt_template", "prompt_format", "labels", "label_token_ids"))


def _scorer(plan: Plan, head: str | None, loaded: LoadedHead | None) -> Scorer:
    """The plan with its loaded head."""
    if loaded is None:
        return Verbalizer(head=None, token_ids=plan.token_ids, labels=plan.labels)
    module = loaded.module
    if plan.method == "verbalizer":
        return Verbalizer(head=module, token_ids=plan.token_ids, labels=plan.labels)
    if not isinstance(module, ClassifierHead):  # cannot happen once the plans agree; never score the wrong kind
        raise HeadKindError(f"head {head!r} is no longer a classifier head; send the request again")
    return Classifier(head=module, labels=tuple(module.labels), pooling="mean" if module.config.pooling == "mean"
                      else "last")


def _classification(labels: tuple[str, ...], result: ClassifyResult, prompt: str, tokens: int,
                    truncated: bool) -> Classification:
    probabilities = result.probabilities
    top = max(range(len(labels)), key=probabilities.__getitem__)  # the first of equals
    return Classification(
        label=labels[top], probability=probabilities[top],
        probabilities=[LabelProbability(label=name, probability=p) for name, p in zip(labels, probabilities,
                                                                                        strict=True)],
        prompt=prompt, prompt_tokens=tokens, truncated=truncated,
        timings=ClassifyTimings(queue_s=result.started_at - result.accepted_at,
                                total_s=result.finished_at - result.accepted_at))


async def classify_all(engine: Engine, jobs: list[ClassifyJob], receive: Receive) -> list[ClassifyResult]:
    """Queue every job (429 for the whole request if the queue cannot take them all) and wait for all of them,
    unless the client disconnects first: then the ones still queued are dropped before they are run."""
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[ClassifyResult]] = [loop.create_future() for _ in jobs]
    gone = asyncio.Event()
    try:
        for job, future in zip(jobs, futures, strict=True):
            engine.submit(Pending(job, _settle(loop, future), gone.is_set))
    except BaseException:
        gone.set()  # the texts already queued must not run for nobody
        raise
    results = asyncio.ensure_future(asyncio.gather(*futures, return_exceptions=True))
    outcomes = await unless_disconnected(results, receive, gone.set)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return [outcome for outcome in outcomes if isinstance(outcome, ClassifyResult)]


def _settle(loop: asyncio.AbstractEventLoop, future: asyncio.Future[ClassifyResult]) -> Settle:
    """The engine's answer (from its worker thread) onto the request's event loop."""
    def settle(result: JobResult | ClassifyResult | None, error: BaseException | None) -> None:
        def deliver() -> None:
            if future.done():
                return
            if isinstance(result, ClassifyResult) and error is None:
                future.set_result(result)
            else:
                future.set_exception(error or RuntimeError("the classification ended with no result"))

        try:
            loop.call_soon_threadsafe(deliver)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass
    return settle
