"""POST /classify on the embedded base: every probability equals a direct computation from Hugging Face's own
forward of the formatted prompt, texts batched together equal texts alone, bad requests are refused at the edge,
and a classification that fails (its head raises, or its prompt breaks the base's forward) fails nobody else.

Heads are built on the spot with random weights (a classifier pooling the last state, one pooling the mean with
the same weights, a linear head saved as a verbalizer with labels, a backward-attention head without labels), so
nothing here depends on training.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from clients import HeadserveClient
from clients.__main__ import build_parser, run
from heads import (
    BackwardAttentionConfig,
    BackwardAttentionHead,
    ClassifierConfig,
    ClassifierHead,
    LinearHead,
    save_head,
)
from heads.base import EMBEDDED_BASE, Base, load_base
from heads.classifier import verbalizer_ids
from heads.sampling import SamplingParams
from server.app import create_app
from server.classify import Classifier, ClassifyJob, ClassifyResult, Verbalizer
from server.engine import Engine
from server.errors import HeadOutputError
from server.metrics import Metrics
from server.sequence import GenerationJob, JobResult, Pending
from server.settings import Settings
from tests.integration.ready import wait_ready

TEMPLATE = "Review: {problem}\nSentiment:"
LABELS = ["negative", "neutral", "positive"]
WORDS = [" The", " apples", " answer", " bags"]  # distinct first tokens on the embedded base's BPE
TEXTS = ["Hana gets 4 bags with 32 apples each.", "The answer is 105", "How many apples does Tara have now?"]
MAX_TEXTS = 4


@pytest.fixture(scope="module")
def base() -> Base:
    return load_base(str(EMBEDDED_BASE))


@pytest.fixture(scope="module")
def heads(base: Base, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The heads as built, by registry name (their saved copies are what the server loads)."""
    root = tmp_path_factory.mktemp("classify-registry")
    torch.manual_seed(0)
    made: dict[str, Any] = {}
    last = ClassifierHead(ClassifierConfig(labels=LABELS, pooling="last", hidden_dim=16), vocab_size=base.vocab_size,
                          n_embd=base.n_embd)
    mean = ClassifierHead(ClassifierConfig(labels=LABELS, pooling="mean", hidden_dim=16), vocab_size=base.vocab_size,
                          n_embd=base.n_embd)
    mean.load_state_dict(last.state_dict())  # same weights: only the pooling differs
    linear = LinearHead(vocab_size=base.vocab_size, n_embd=base.n_embd).init_from(base.embeddings)
    with torch.no_grad():
        linear.proj.weight.add_(torch.randn_like(linear.proj.weight) * 0.5)
    attention = BackwardAttentionHead(BackwardAttentionConfig(latent_dim=32, residual=False),
                                      vocab_size=base.vocab_size, n_embd=base.n_embd)
    ids = [word[0] for word in verbalizer_ids(WORDS[:3], base.tokenizer, "plain")]
    for name, head, extra in (("sent-last", last, {}), ("sent-mean", mean, {}),
                              ("verbal", linear, {"labels": LABELS, "label_token_ids": ids}),
                              ("attention", attention, {}), ("failing", last, {})):
        save_head(head, root / name, base.info(), task="sentiment", prompt_template=TEMPLATE, **extra)
        made[name] = head
    made["root"] = root
    return made


@pytest.fixture(scope="module")
def client(heads: dict[str, Any]) -> Iterator[TestClient]:
    settings = Settings(base_model=str(EMBEDDED_BASE), heads_dir=heads["root"], device="cpu",
                        max_classify_texts=MAX_TEXTS)
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


def hf_final(base: Base, prompt: str) -> torch.Tensor:
    """HF's own last_hidden_state (1, T, D) of the prompt exactly as training tokenises it (plain format)."""
    ids = torch.tensor([base.tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        return base.hidden_states(ids).last_hidden_state


def probabilities(response: dict[str, Any]) -> list[list[float]]:
    return [[p["probability"] for p in result["probabilities"]] for result in response["results"]]


def classify(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post("/classify", json=body)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_the_base_as_a_verbalizer_equals_its_next_token_logits_on_the_label_tokens(client: TestClient,
                                                                                    base: Base) -> None:
    text = "How many"  # the base spreads its mass over these words here
    body = classify(client, text=text, label_words=WORDS)
    ids = [base.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in WORDS]
    with torch.no_grad():
        logits = base.model(torch.tensor([base.tokenizer(text)["input_ids"]])).logits[0, -1]  # (V,)
    want = torch.softmax(logits[ids], dim=-1)
    got = torch.tensor(probabilities(body)[0])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert body["method"] == "verbalizer" and body["head"] is None and body["labels"] == WORDS
    assert body["label_token_ids"] == ids and body["results"][0]["prompt"] == text  # the base's plain style
    top = int(want.argmax())
    assert body["results"][0]["label"] == WORDS[top] and body["results"][0]["probability"] == pytest.approx(
        float(want[top]), abs=1e-6)
    assert abs(sum(probabilities(body)[0]) - 1) < 1e-5 and max(probabilities(body)[0]) < 0.99  # not degenerate


@pytest.mark.parametrize("name", ["verbal", "attention"])
def test_a_generative_head_as_a_verbalizer_equals_its_forward_on_the_label_tokens(
        client: TestClient, base: Base, heads: dict[str, Any], name: str) -> None:
    """`verbal` records its labels and their token ids; `attention` (served in factored form) gets label words."""
    words = WORDS[:3]
    body = classify(client, head=name, texts=TEXTS, **({} if name == "verbal" else {"label_words": words}))
    ids = [word[0] for word in verbalizer_ids(words, base.tokenizer, "plain")]
    assert body["label_token_ids"] == ids and body["labels"] == (LABELS if name == "verbal" else words)
    for text, got in zip(TEXTS, probabilities(body), strict=True):
        prompt = TEMPLATE.replace("{problem}", text)
        with torch.no_grad():
            logits = heads[name](hf_final(base, prompt), base.embeddings)[0, -1]  # (V,)
        torch.testing.assert_close(torch.tensor(got), torch.softmax(logits[ids], dim=-1), atol=1e-5, rtol=1e-5)


def test_classifier_heads_pool_the_last_and_the_mean_state_as_direct_computations(
        client: TestClient, base: Base, heads: dict[str, Any]) -> None:
    results = {name: probabilities(classify(client, head=name, texts=TEXTS)) for name in ("sent-last", "sent-mean")}
    for i, text in enumerate(TEXTS):
        hidden = hf_final(base, TEMPLATE.replace("{problem}", text))  # (1, T, D)
        with torch.no_grad():
            last = torch.softmax(heads["sent-last"](hidden), dim=-1)[0]  # ClassifierHead.forward pools as configured
            mean = torch.softmax(heads["sent-mean"](hidden), dim=-1)[0]
        assert not torch.allclose(mean, last, atol=1e-3)  # same weights: the pooling makes the difference
        torch.testing.assert_close(torch.tensor(results["sent-last"][i]), last, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.tensor(results["sent-mean"][i]), mean, atol=1e-5, rtol=1e-5)
    body = classify(client, head="sent-mean", text=TEXTS[0])
    assert body["method"] == "classifier" and body["labels"] == LABELS and body["label_token_ids"] is None
    result = body["results"][0]
    assert [p["label"] for p in result["probabilities"]] == LABELS  # label order, not sorted
    assert result["prompt"] == TEMPLATE.replace("{problem}", TEXTS[0]) and result["prompt_tokens"] > 5
    assert result["timings"]["total_s"] >= result["timings"]["queue_s"] >= 0


@pytest.mark.parametrize("body", [{"head": "sent-mean"}, {"head": "verbal"}, {"label_words": WORDS}])
def test_texts_together_equal_each_text_alone(client: TestClient, body: dict[str, Any]) -> None:
    together = probabilities(classify(client, texts=TEXTS, **body))
    alone = [probabilities(classify(client, text=text, **body))[0] for text in TEXTS]
    torch.testing.assert_close(torch.tensor(together), torch.tensor(alone), atol=1e-6, rtol=1e-6)
    assert len({tuple(round(p, 4) for p in row) for row in together}) == len(TEXTS)  # the texts differ


@pytest.mark.parametrize(("body", "status", "detail"), [
    ({"head": "sent-last"}, 422, "exactly one of `text`"),
    ({"head": "sent-last", "text": "a", "texts": ["b"]}, 422, "exactly one of `text`"),
    ({"head": "sent-last", "texts": []}, 422, "texts"),
    ({"head": "sent-last", "text": "   "}, 422, "empty or only whitespace"),
    ({"head": "sent-last", "texts": ["a"] * (MAX_TEXTS + 1)}, 422, f"at most {MAX_TEXTS} (MAX_CLASSIFY_TEXTS)"),
    ({"head": "sent-last", "text": "a", "label_words": [" a", " b"]}, 422, "'sent-last' is a classifier head"),
    ({"text": "a"}, 422, "the base's own LM head classifies only by label words"),
    ({"head": "attention", "text": "a"}, 422, "'attention' is a backward_attention head that records no labels"),
    ({"text": "a", "label_words": [" The"]}, 422, "label_words"),
    ({"text": "a", "label_words": [" apples", " apples"]}, 422, "start with the same token"),
    ({"text": "a", "label_words": [" The", "x" * 65]}, 422, "label_words"),
    ({"head": "sent-last", "text": "7" * 3000}, 422, "limit"),
    ({"head": "nope", "text": "a"}, 404, "nope"),
    ({"head": "Bad Name", "text": "a"}, 422, "head"),
    ({"head": "sent-last", "text": "a", "raw": True}, 422, "raw"),
])
def test_bad_requests_are_refused_before_anything_is_queued(client: TestClient, body: dict[str, Any], status: int,
                                                            detail: str) -> None:
    engine = client.app.state.runtime.engine  # type: ignore[attr-defined]
    submitted = []
    real = engine.submit
    engine.submit = lambda pending: submitted.append(pending) or real(pending)
    try:
        response = client.post("/classify", json=body)
    finally:
        engine.submit = real
    assert response.status_code == status, response.text
    assert detail in response.json()["detail"]
    assert submitted == []


def metric(client: TestClient, name: str, **labels: str) -> float:
    families = text_string_to_metric_families(client.get("/metrics").text)
    return sum(s.value for f in families for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_a_failing_classifier_fails_its_own_request_while_a_concurrent_generation_succeeds(
        client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    failing = runtime.head_cache.get("failing").module

    def broken(pooled: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom /secret/path")

    monkeypatch.setattr(failing, "classify", broken)
    generate = {"prompt": "Hana gets 4 bags", "max_new_tokens": 48, "ignore_eos": True}
    alone = client.post("/generate", json=generate).json()["text"]
    before = metric(client, "headserve_failed_requests_total", head="failing", reason="head_output")
    answers: dict[str, Any] = {}

    def post(key: str, route: str, body: dict[str, Any]) -> None:
        answers[key] = client.post(route, json=body)

    threads = [threading.Thread(target=post, args=("generate", "/generate", generate))]
    threads += [threading.Thread(target=post, args=(f"bad{i}", "/classify", {"head": "failing", "texts": TEXTS}))
                for i in range(3)]
    threads += [threading.Thread(target=post, args=("good", "/classify", {"head": "sent-last", "texts": TEXTS}))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert answers["generate"].status_code == 200 and answers["generate"].json()["text"] == alone
    assert answers["good"].status_code == 200
    for i in range(3):
        assert answers[f"bad{i}"].status_code == 409
        detail = answers[f"bad{i}"].json()["detail"]
        assert "head 'failing' cannot classify" in detail and "secret" not in detail
    assert metric(client, "headserve_failed_requests_total", head="failing", reason="head_output") == before + 9


def test_metrics_count_classifications_per_head_and_forget_a_deleted_head(client: TestClient) -> None:
    counted = metric(client, "headserve_classifications_total", head="sent-last")
    timed = metric(client, "headserve_classify_seconds_count", head="sent-last")
    base = metric(client, "headserve_classifications_total", head="base")
    classify(client, head="sent-last", texts=TEXTS[:2])
    classify(client, text="a", label_words=WORDS[:2])
    assert metric(client, "headserve_classifications_total", head="sent-last") == counted + 2
    assert metric(client, "headserve_classify_seconds_count", head="sent-last") == timed + 2
    assert metric(client, "headserve_classifications_total", head="base") == base + 1
    assert metric(client, "headserve_requests_total", route="/classify", head="sent-last", status="200") >= 1
    client.post("/classify", json={"head": "not-registered", "text": "a"})
    assert metric(client, "headserve_classifications_total", head="not-registered") == 0
    assert metric(client, "headserve_requests_total", route="/classify", head="unknown", status="404") >= 1
    classify(client, head="sent-mean", text="a")
    assert client.delete("/heads/sent-mean").status_code == 204
    text = client.get("/metrics").text
    assert 'head="sent-mean"' not in text


def test_the_client_and_the_cli_classify(client: TestClient, capsys: pytest.CaptureFixture[str]) -> None:
    http = HeadserveClient(http=client)  # type: ignore[arg-type]
    one = http.classify(TEXTS[0], "sent-last")
    assert one.method == "classifier" and one.labels == LABELS and len(one.results) == 1
    result = one.results[0]
    assert list(result.probabilities) == LABELS and result.label == max(LABELS, key=result.probabilities.__getitem__)
    many = http.classify(TEXTS, label_words=WORDS)
    assert many.head is None and many.label_token_ids is not None and len(many.results) == len(TEXTS)
    run(build_parser().parse_args(["classify", "--head", "sent-last", TEXTS[0], TEXTS[1]]), http)
    out = capsys.readouterr().out
    assert f"{TEXTS[0]!r} -> {result.label} ({result.probability:.3f})" in out
    assert all(label in out for label in LABELS) and "#" in out


def test_the_head_list_says_what_each_head_can_classify_into(client: TestClient) -> None:
    listed = {h.name: h for h in HeadserveClient(http=client).list_heads()}  # type: ignore[arg-type]
    assert listed["sent-last"].generative is False and listed["sent-last"].labels == LABELS
    assert listed["verbal"].generative is True and listed["verbal"].labels == LABELS
    assert listed["attention"].generative is True and listed["attention"].labels is None


def test_openapi_documents_the_route_with_examples(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    post = spec["paths"]["/classify"]["post"]
    assert set(post["requestBody"]["content"]["application/json"]["examples"]) >= {"classifier head",
                                                                                   "base with label words"}
    ok = post["responses"]["200"]["content"]["application/json"]
    assert ok["schema"]["$ref"].endswith("/ClassifyResponse") and ok["example"]["results"][0]["label"] == "positive"


# -- the engine itself: classifications in the same step as a generation, failures confined -------------------


def step_together(base: Base, generation: GenerationJob, classifications: list[ClassifyJob],
                  engine: Engine | None = None) -> tuple[JobResult, list[ClassifyResult | BaseException]]:
    """Queue the classifications, then run the generation with them: all are admitted in the first step."""
    engine = engine or Engine(base, Metrics(), max_queue=16, max_batch_size=8, max_batch_tokens=4096)
    answers: list[ClassifyResult | BaseException] = [RuntimeError("unsettled")] * len(classifications)

    def settle(i: int) -> Any:
        def answer(result: Any, error: BaseException | None) -> None:
            answers[i] = error if error is not None else result
        return answer

    for i, job in enumerate(classifications):
        engine.submit(Pending(job, settle(i)))
    (result,) = engine.run_until_done([generation])
    return result, answers


def prompt_ids(base: Base, text: str) -> list[int]:
    return list(base.tokenizer(TEMPLATE.replace("{problem}", text))["input_ids"])


def generation(base: Base) -> GenerationJob:
    return GenerationJob(prompt_ids=prompt_ids(base, TEXTS[0]), head=None, head_label="base", params=SamplingParams(),
                         seed=0, max_new_tokens=12, ignore_eos=True)


def test_a_raising_classifier_beside_a_generation_in_one_step_fails_alone(base: Base, heads: dict[str, Any],
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    good = Classifier(head=heads["sent-mean"], labels=tuple(LABELS), pooling="mean")
    bad_head = ClassifierHead(ClassifierConfig(labels=LABELS), vocab_size=base.vocab_size, n_embd=base.n_embd)
    monkeypatch.setattr(bad_head, "classify", lambda pooled: torch.full((pooled.shape[0], 3), float("nan")))
    raising_head = ClassifierHead(ClassifierConfig(labels=LABELS), vocab_size=base.vocab_size, n_embd=base.n_embd)
    monkeypatch.setattr(raising_head, "classify", lambda pooled: 1 / 0)
    verbal = Verbalizer(head=None, token_ids=(275, 378), labels=("the", "apples"))
    jobs = [ClassifyJob(prompt_ids(base, TEXTS[1]), "sent-mean", good),
            ClassifyJob(prompt_ids(base, TEXTS[1]), "nan", Classifier(bad_head, tuple(LABELS), "last")),
            ClassifyJob(prompt_ids(base, TEXTS[2]), "raising", Classifier(raising_head, tuple(LABELS), "mean")),
            ClassifyJob(prompt_ids(base, TEXTS[2]), "base", verbal)]
    alone = step_together(base, generation(base), [])[0]
    result, answers = step_together(base, generation(base), jobs)
    assert result.main.token_ids == alone.main.token_ids
    for i in (0, 3):
        solo = step_together(base, generation(base), [jobs[i]])[1][0]
        assert isinstance(answers[i], ClassifyResult) and isinstance(solo, ClassifyResult)
        torch.testing.assert_close(torch.tensor(answers[i].probabilities), torch.tensor(solo.probabilities),
                                   atol=1e-6, rtol=1e-6)
    assert isinstance(answers[1], HeadOutputError) and "non-finite" in str(answers[1])
    assert isinstance(answers[2], HeadOutputError) and "ZeroDivisionError" in str(answers[2])


def test_a_classification_whose_prompt_breaks_the_forward_fails_alone(base: Base, heads: dict[str, Any]) -> None:
    engine = Engine(base, Metrics(), max_queue=16, max_batch_size=8, max_batch_tokens=4096)
    poison = prompt_ids(base, "poison")
    real = engine.model.step

    def step(cache: Any, ids: Any, lengths: Any, prefills: Any) -> Any:
        if any(p.token_ids == poison for p in prefills):
            raise RuntimeError("the base cannot take this prompt")
        return real(cache, ids, lengths, prefills)

    engine.model.step = step  # type: ignore[method-assign]
    good = Classifier(head=heads["sent-last"], labels=tuple(LABELS), pooling="last")
    jobs = [ClassifyJob(poison, "sent-last", good), ClassifyJob(prompt_ids(base, TEXTS[1]), "sent-last", good)]
    alone = step_together(base, generation(base), [])[0]
    result, answers = step_together(base, generation(base), jobs, engine)
    assert result.main.token_ids == alone.main.token_ids
    assert isinstance(answers[0], RuntimeError) and "cannot take" in str(answers[0])
    assert isinstance(answers[1], ClassifyResult)
    failed = engine.metrics.registry.get_sample_value("headserve_failed_requests_total",
                                                      {"head": "sent-last", "reason": "forward"})
    assert failed == 1


def test_truncate_keeps_a_long_texts_last_tokens_as_training_cuts_them(client: TestClient, base: Base,
                                                                        heads: dict[str, Any]) -> None:
    limit = client.app.state.runtime.prompt_token_limit  # type: ignore[attr-defined]
    long_text = " ".join([TEXTS[1]] * 400) + " but the ending is " + TEXTS[0]
    refused = client.post("/classify", json={"head": "sent-last", "text": long_text})
    assert refused.status_code == 422 and "truncate: true" in refused.json()["detail"]
    body = classify(client, head="sent-last", texts=[TEXTS[0], long_text], truncate=True)
    short, cut = body["results"]
    assert short["truncated"] is False and short["prompt"] == TEMPLATE.replace("{problem}", TEXTS[0])
    assert cut["truncated"] is True and cut["prompt_tokens"] == limit
    full_ids = base.tokenizer(TEMPLATE.replace("{problem}", long_text))["input_ids"]
    kept = full_ids[-limit:]  # training.classify_data.truncate_prompt: the last tokens, the template's end included
    assert cut["prompt"] == base.tokenizer.decode(kept) and cut["prompt"].endswith("Sentiment:")
    with torch.no_grad():
        expected = torch.softmax(heads["sent-last"](base.hidden_states(torch.tensor([kept])).last_hidden_state), -1)[0]
    torch.testing.assert_close(torch.tensor(probabilities(body)[1]), expected, atol=1e-5, rtol=1e-5)
    http = HeadserveClient(http=client)  # type: ignore[arg-type]
    assert http.classify(long_text, "sent-last", truncate=True).results[0].truncated
    run(build_parser().parse_args(["classify", "--head", "sent-last", "--truncate", long_text]), http)
