"""Request and response bodies of `POST /classify` (docs/api.md); unknown request fields are rejected.

Bounds a client controls are written inline, so a request past them is a 422 before anything is tokenised;
the number of texts a server takes is its MAX_CLASSIFY_TEXTS setting (checked by the route), below the hard
cap here.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, model_validator

from server.schemas import MAX_PROMPT_CHARS, HeadName, Strict

MAX_TEXTS = 256  # hard cap on texts per request; the MAX_CLASSIFY_TEXTS setting (default 32) may only lower it
MAX_LABELS = 32  # label words per request
MAX_LABEL_CHARS = 64

Text = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
LabelWord = Annotated[str, Field(min_length=1, max_length=MAX_LABEL_CHARS)]

EXAMPLE_REVIEW = "A gorgeous, witty, seductive movie."
REQUEST_EXAMPLES = {
    "classifier head": {
        "summary": "a classifier head, one text",
        "value": {"head": "sentiment-sst", "text": EXAMPLE_REVIEW},
    },
    "several texts": {
        "summary": "one head, several texts (batched in the same engine steps)",
        "value": {"head": "sentiment-cfimdb", "texts": [EXAMPLE_REVIEW, "The plot is a mess and the jokes fall flat."]},
    },
    "base with label words": {
        "summary": "the base's own LM head as a verbalizer: label words scored by their first token",
        "value": {"text": f"Review: {EXAMPLE_REVIEW}\nSentiment:", "label_words": [" positive", " negative"]},
    },
}
RESPONSE_EXAMPLE = {
    "head": "sentiment-cfimdb",
    "method": "classifier",
    "labels": ["negative", "positive"],
    "label_token_ids": None,
    "results": [{
        "label": "positive",
        "probability": 0.93,
        "probabilities": [{"label": "negative", "probability": 0.07}, {"label": "positive", "probability": 0.93}],
        "prompt": f"Review: {EXAMPLE_REVIEW}\nSentiment:",
        "prompt_tokens": 12,
        "truncated": False,
        "timings": {"queue_s": 0.001, "total_s": 0.02},
    }],
}


class ClassifyRequest(Strict):
    head: HeadName | None = None  # null/absent: the base's own LM head, which needs label_words
    text: Text | None = None  # exactly one of text and texts
    texts: list[Text] | None = Field(default=None, min_length=1, max_length=MAX_TEXTS)
    # Score a generative head (or the base) on these words' first tokens; tokenised as given, so include the
    # leading space the prompt's next word would have (" positive" after "Sentiment:" for GPT-2's BPE).
    label_words: list[LabelWord] | None = Field(default=None, min_length=2, max_length=MAX_LABELS)
    # A prompt past the server's token limit keeps its last tokens (the template's end, which the head reads
    # last), as training.fit cuts its training texts; false: such a text is a 422.
    truncate: bool = False

    @model_validator(mode="after")
    def _one_kind_of_text(self) -> ClassifyRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("send exactly one of `text` (one text) and `texts` (a list)")
        if any(not t.strip() for t in self.all_texts()):
            raise ValueError("texts must not be empty or only whitespace")
        return self

    def all_texts(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])


class LabelProbability(BaseModel):
    label: str
    probability: float


class ClassifyTimings(BaseModel):
    queue_s: float  # accepted -> the engine step that scored it began
    total_s: float  # accepted -> scored


class Classification(BaseModel):
    label: str  # the most probable label (the first in label order on a tie)
    probability: float  # its probability
    probabilities: list[LabelProbability]  # every label, in label order (the response's `labels`), not sorted
    prompt: str  # the text as the base read it: formatted with the head's prompt template (what was kept of it)
    prompt_tokens: int
    truncated: bool  # its first tokens were dropped to fit the limit (only with `truncate`)
    timings: ClassifyTimings


class ClassifyResponse(BaseModel):
    head: str | None  # null: the base's own LM head
    method: Literal["classifier", "verbalizer"]  # a classifier head, or next-token logits on label tokens
    labels: list[str]  # the label order of every result's `probabilities`
    label_token_ids: list[int] | None  # verbalizer: the token scored for each label; null for a classifier head
    results: list[Classification]  # one per text, in the request's order
