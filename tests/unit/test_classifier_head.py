"""The classifier kind: pooling honours the padding mask, the optional hidden layer, the saved folder round
trip, refusals from the config alone (nothing allocated), the verbalizer fields, and that it will not decode."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import heads.classifier as classifier_module
from heads import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    ClassifierConfig,
    ClassifierHead,
    HeadFormatError,
    LinearHead,
    load_head,
    load_head_bytes,
    save_head,
)
from heads.classifier import MAX_LABELS, check_verbalizer, pool, verbalizer_ids
from heads.storage import max_head_parameters, parse_metadata

V, D = 97, 24


def make(pooling: str = "last", hidden_dim: int | None = None, labels: list[str] | None = None) -> ClassifierHead:
    torch.manual_seed(0)
    return ClassifierHead(ClassifierConfig(labels or ["neg", "neutral", "pos"], pooling=pooling,
                                           hidden_dim=hidden_dim), vocab_size=V, n_embd=D).eval()


def raw_config(**config: Any) -> dict[str, Any]:
    return {"head_type": "classifier", "config": {"labels": ["a", "b"], **config}, "vocab_size": V, "n_embd": D,
            "prompt_template": "{problem}"}


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_pooling_reads_only_the_real_tokens_whatever_the_padding(pooling: str) -> None:
    """A row padded right, one padded left and one unpadded give what each prompt gives alone."""
    torch.manual_seed(1)
    lengths = [3, 5, 2]
    prompts = [torch.randn(n, D) for n in lengths]
    hidden = torch.full((3, 5, D), 1e6)  # padding states that would swamp any pooling that read them
    mask = torch.zeros(3, 5, dtype=torch.long)
    hidden[0, :3], mask[0, :3] = prompts[0], 1  # right padding
    hidden[1], mask[1] = prompts[1], 1
    hidden[2, 3:], mask[2, 3:] = prompts[2], 1  # left padding
    pooled = pool(hidden, mask, pooling)
    for row, states in enumerate(prompts):
        alone = states[-1] if pooling == "last" else states.mean(0)
        torch.testing.assert_close(pooled[row], alone)
    head = make(pooling)
    torch.testing.assert_close(head(hidden, None, mask), head.classify(pooled))
    with pytest.raises(ValueError, match="at least one real token"):
        pool(hidden, torch.zeros(3, 5), pooling)


def test_without_a_mask_every_position_is_real() -> None:
    hidden = torch.randn(2, 4, D)
    torch.testing.assert_close(pool(hidden, None, "last"), hidden[:, -1])
    torch.testing.assert_close(pool(hidden, None, "mean"), hidden.mean(1))
    torch.testing.assert_close(pool(hidden, torch.ones(2, 4), "mean"), hidden.mean(1))


@pytest.mark.parametrize("hidden_dim", [None, 7])
def test_the_head_is_linear_or_has_one_nonlinear_hidden_layer(hidden_dim: int | None) -> None:
    head = make(hidden_dim=hidden_dim)
    config = head.config
    assert config.parameter_count(V, D) == sum(p.numel() for p in head.parameters()) <= max_head_parameters(V, D)
    a, b = torch.randn(4, D), torch.randn(4, D)
    with torch.no_grad():
        logits = head.classify(a)
        additive = torch.allclose(head.classify(a + b) - head.classify(b), logits - head.classify(torch.zeros(4, D)),
                                  atol=1e-5)
    assert logits.shape == (4, 3) and head.labels == ["neg", "neutral", "pos"]
    assert additive == (hidden_dim is None)  # affine without a hidden layer; the GELU makes it nonlinear


@pytest.mark.parametrize(("pooling", "hidden_dim"), [("last", None), ("mean", 5)])
def test_save_and_load_round_trip(tmp_path: Path, pooling: str, hidden_dim: int | None) -> None:
    head = make(pooling, hidden_dim)
    meta = save_head(head, tmp_path / "c", {"base_fingerprint": "sha256:x"}, task="sentiment",
                     prompt_template="Review: {problem}\nSentiment:")
    loaded, read = load_head(tmp_path / "c", fingerprint="sha256:x", vocab_size=V, n_embd=D)
    assert isinstance(loaded, ClassifierHead) and read.head_type == "classifier" == meta.head_type
    assert read.config == {"labels": ["neg", "neutral", "pos"], "pooling": pooling, "hidden_dim": hidden_dim}
    assert read.labels is None and "labels" not in json.loads((tmp_path / "c" / CONFIG_NAME).read_text())
    hidden, mask = torch.randn(2, 6, D), torch.ones(2, 6)
    torch.testing.assert_close(loaded(hidden, None, mask), head(hidden, None, mask), rtol=0, atol=0)


@pytest.mark.parametrize(("config", "fragment"), [
    ({"hidden_dim": 10**12}, "hidden_dim 1000000000000 is over the bound 96"),
    ({"labels": [f"l{i}" for i in range(MAX_LABELS + 1)]}, "must hold 2 to 1000 names"),
    ({"labels": ["only"]}, "must hold 2 to 1000 names"),
    ({"labels": ["a", "a"]}, "must be distinct"),
    ({"labels": ["a", ""]}, "is not a label name"),
    ({"labels": ["a", " b"]}, "is not a label name"),
    ({"labels": ["a", "x" * 65]}, "is not a label name"),
    ({"labels": ["a", 3]}, "must be strings"),
    ({"labels": "ab"}, "must be a list of strings"),
    ({"pooling": "max"}, "pooling must be one of"),
    ({"hidden_dim": 0}, "hidden_dim must be a positive integer"),
    ({"hidden_dim": True}, "hidden_dim must be a positive integer"),
])
def test_bad_configs_are_refused_before_anything_is_built(config: dict[str, Any], fragment: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def no_layers(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a layer was built for a config that should have been refused")

    monkeypatch.setattr(classifier_module.nn, "Linear", no_layers)
    data = json.dumps(raw_config(**config)).encode()
    with pytest.raises(HeadFormatError, match=fragment):
        parse_metadata(data)
    with pytest.raises(HeadFormatError, match=fragment):
        load_head_bytes(data, b"")
    with pytest.raises(ValueError, match=fragment):
        ClassifierHead(ClassifierConfig(**{"labels": ["a", "b"], **config}), vocab_size=V, n_embd=D)


def test_a_missing_labels_field_is_refused_not_a_crash() -> None:
    raw = raw_config()
    del raw["config"]["labels"]
    with pytest.raises(HeadFormatError, match="labels must hold 2 to 1000 names, got 0"):
        parse_metadata(json.dumps(raw).encode())


def test_decode_and_prepare_raise_type_error_naming_the_kind() -> None:
    head = make()
    assert not head.generative and LinearHead.generative
    with pytest.raises(TypeError, match="kind 'classifier'.*cannot decode tokens"):
        head.decode(torch.randn(2, D))
    with pytest.raises(TypeError, match="kind 'classifier'"):
        head.prepare(torch.randn(V, D))


def test_a_generative_head_records_verbalizer_labels_and_token_ids(tmp_path: Path) -> None:
    head = LinearHead(vocab_size=V, n_embd=D)
    save_head(head, tmp_path / "v", task="sentiment", labels=["bad", "good"], label_token_ids=[5, 9])
    _, meta = load_head(tmp_path / "v")
    assert meta.labels == ["bad", "good"] and meta.label_token_ids == [5, 9]
    raw = json.loads((tmp_path / "v" / CONFIG_NAME).read_text())
    weights = (tmp_path / "v" / WEIGHTS_NAME).read_bytes()
    for changes, fragment in [({"label_token_ids": None}, "give both or neither"),
                              ({"label_token_ids": [5]}, "a list of 2 token ids"),
                              ({"label_token_ids": [5, 5]}, "must be distinct"),
                              ({"label_token_ids": [5, V]}, rf"token ids in \[0, {V}\)"),
                              ({"label_token_ids": [5, True]}, "token ids"),
                              ({"labels": ["bad", "bad"]}, "must be distinct")]:
        with pytest.raises(HeadFormatError, match=fragment):
            load_head_bytes(json.dumps({**raw, **changes}).encode(), weights)
    with pytest.raises(ValueError, match="must be distinct"):  # never written in the first place
        save_head(head, tmp_path / "w", labels=["bad", "good"], label_token_ids=[5, 5])
    assert not (tmp_path / "w").exists()


def test_a_classifier_takes_no_verbalizer_fields(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="for generative heads"):
        save_head(make(), tmp_path / "c", labels=["a", "b", "c"], label_token_ids=[1, 2, 3])
    check_verbalizer(None, None, V)  # neither: fine


class _Tokenizer:
    """Words to ids by a table: ' very good' and ' very bad' share their first token."""

    table = {" good": [1], " bad": [2], " very good": [3, 1], " very bad": [3, 2], "good": [4], "bad": [5], "": []}

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        assert add_special_tokens is False
        return {"input_ids": self.table[text]}


def test_verbalizer_ids_are_the_words_as_answers_and_must_start_differently() -> None:
    tok = _Tokenizer()
    assert verbalizer_ids([" bad", " good"], tok, "plain") == [[2], [1]]
    assert verbalizer_ids([" bad", " good"], tok, "chat") == [[5], [4]]  # a chat answer starts without a space
    with pytest.raises(ValueError, match="' very bad', ' very good' start with the same token"):
        verbalizer_ids([" very bad", " bad", " very good"], tok, "plain")
    with pytest.raises(ValueError, match="encodes to no tokens"):
        verbalizer_ids(["", " bad"], tok, "plain")
