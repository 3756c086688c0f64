"""`training.fit --kind classifier`, the verbalizer (`--label-words`) and `training.evaluate` on classification,
in-process on the embedded base with small synthetic text/label data written here (seconds)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from heads import WEIGHTS_NAME, ClassifierConfig, ClassifierHead, load_head, save_head
from heads.base import EMBEDDED_BASE, Base, load_base
from training import evaluate, fit

WORDS = {0: ["awful", "terrible", "dull"], 1: ["fine", "average", "plain"], 2: ["great", "lovely", "superb"]}
LABELS = "negative,neutral,positive"
VERBALIZER = " bad, fine, good"  # first tokens differ on the embedded base's tokenizer


def rows(n: int, seed: int, weights: tuple[int, ...] = (2, 1, 3)) -> list[dict[str, Any]]:
    """Three labels, imbalanced 2:1:3, each text naming one word of its label."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.choices([0, 1, 2], weights=weights)[0]
        out.append({"text": f"The film was {rng.choice(WORDS[label])} and the {rng.choice(['plot', 'cast'])} "
                            f"{rng.choice(['moved', 'dragged', 'was there'])}.", "label": label})
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sentiment")
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(240, 0)) + "not json\n"
                                     + json.dumps({"text": "", "label": 1}) + "\n")
    (out / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(60, 1, (1, 1, 1))))
    return out


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADSERVE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def base() -> Base:
    return load_base(str(EMBEDDED_BASE))


def run_fit(data: Path, out: Path, *extra: str) -> None:
    fit.main(["--base", str(EMBEDDED_BASE), "--data", str(data), "--task", "sentiment", "--out", str(out),
              "--val-fraction", "0.25", "--seed", "0", *extra])


def test_fit_writes_a_classifier_with_its_class_weights(data_dir: Path, tmp_path: Path, base: Base,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    run_fit(data_dir, tmp_path / "clf", "--kind", "classifier", "--labels", LABELS, "--epochs", "5")
    head, meta = load_head(tmp_path / "clf", fingerprint=base.fingerprint, vocab_size=base.vocab_size,
                           n_embd=base.n_embd)
    assert isinstance(head, ClassifierHead) and meta.head_type == "classifier" and meta.task == "sentiment"
    assert meta.config == {"labels": ["negative", "neutral", "positive"], "pooling": "last", "hidden_dim": None}
    assert meta.prompt_template == "Review: {problem}\nSentiment:" and meta.prompt_format == "plain"
    t = meta.training
    assert t["rows_read"] == 242 and t["rows_skipped"] == {"malformed row": 1, "empty text": 1}
    assert t["examples"] == 180 and t["held_out_examples"] == 60 and t["steps"] == 5 * 12  # batches of 16
    counts, weights = t["class_counts"], t["class_weights"]
    assert sum(counts.values()) == 180 and min(counts.values()) > 0
    assert min(counts, key=counts.__getitem__) == max(weights, key=weights.__getitem__)  # the rarest weighs most
    for name, n in counts.items():  # inverse frequency, n / (C n_c): the weighted mean over the rows is 1
        assert weights[name] == pytest.approx(180 / (3 * n), abs=1e-4)
    assert 0 <= t["final_metrics"]["held_out_accuracy"] <= 1 and t["final_metrics"]["held_out_loss"] > 0
    assert 1 <= t["kept_epoch"] <= 5 and t["parameters"] == 3 * base.n_embd + 3
    assert (tmp_path / "clf" / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "class weights {'negative'" in printed and "training.evaluate --heads" in printed

    run_fit(data_dir, tmp_path / "plain", "--kind", "classifier", "--labels", LABELS, "--epochs", "5",
            "--no-class-weights")
    plain, plain_meta = load_head(tmp_path / "plain")
    assert plain_meta.training["class_weights"] is None
    assert not torch.equal(plain.state_dict()["out.weight"], head.state_dict()["out.weight"])


def test_same_seed_same_bytes_through_the_feature_cache(data_dir: Path, tmp_path: Path) -> None:
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        run_fit(data_dir, tmp_path / name, "--kind", "classifier", "--epochs", "3", "--seed", seed,
                "--pooling", "mean", "--hidden-dim", "8")
    a, b, c = ((tmp_path / n / WEIGHTS_NAME).read_bytes() for n in "abc")
    configs = [json.loads((tmp_path / n / "head_config.json").read_text()) for n in "ab"]
    assert [cfg["training"]["feature_pass"]["from_disk"] for cfg in configs] == [False, True]
    assert a == b and a != c
    assert configs[0]["config"] == {"labels": ["label_0", "label_1", "label_2"], "pooling": "mean", "hidden_dim": 8}


@pytest.mark.parametrize("flags", [["--kind", "linear", "--pooling", "mean"],
                                   ["--kind", "classifier", "--label-words", " bad, good"],
                                   ["--kind", "lowrank", "--labels", "a,b"]])
def test_flags_of_another_kind_are_refused(data_dir: Path, tmp_path: Path, flags: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_fit(data_dir, tmp_path / "x", *flags)
    assert exit_info.value.code == 2 and not (tmp_path / "x").exists()


def test_a_verbalizer_records_its_labels_and_first_tokens(data_dir: Path, tmp_path: Path, base: Base) -> None:
    run_fit(data_dir, tmp_path / "verb", "--kind", "linear", "--label-words", VERBALIZER, "--max-steps", "3")
    _, meta = load_head(tmp_path / "verb")
    firsts = [base.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in VERBALIZER.split(",")]
    assert meta.head_type == "linear" and meta.labels == ["bad", "fine", "good"]
    assert meta.label_token_ids == firsts and len(set(firsts)) == 3
    assert meta.prompt_template == "Review: {problem}\nSentiment:"
    assert meta.training["target_tokens"] > 0 and meta.training["rows_skipped"] == {"malformed row": 1,
                                                                                     "empty text": 1}


def test_label_words_sharing_a_first_token_are_refused(data_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:  # " good" and " great" both start with " g" here
        run_fit(data_dir, tmp_path / "verb", "--kind", "linear", "--label-words", " bad, good, great")
    assert exit_info.value.code == 2 and not (tmp_path / "verb").exists()
    assert "' good', ' great' start with the same token" in capsys.readouterr().err


def test_evaluate_reports_classifiers_verbalizers_and_the_base_beside_references(
        data_dir: Path, tmp_path: Path, base: Base) -> None:
    run_fit(data_dir, tmp_path / "clf", "--kind", "classifier", "--labels", LABELS)
    run_fit(data_dir, tmp_path / "verb", "--kind", "linear", "--label-words", VERBALIZER, "--max-steps", "3")
    out = tmp_path / "report"
    evaluate.main(["--base", str(EMBEDDED_BASE), "--heads", str(tmp_path / "clf"), str(tmp_path / "verb"),
                   "--data", str(data_dir), "--out", str(out), "--label-words", VERBALIZER,
                   "--reference", "last-layer GPT-2 124M=0.462", "--reference", "full GPT-2=0.513"])
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "classify" and report["split"] == "dev" and report["n_examples"] == 60
    assert [r["name"] for r in report["rows"]] == ["base (zero-shot)", "clf", "verb"]
    assert [r["kind"] for r in report["rows"]] == ["base zero-shot", "classifier", "verbalizer"]
    expected = report["expected"]
    for row in report["rows"]:
        assert row["accuracy_ci_low"] <= row["accuracy"] <= row["accuracy_ci_high"]
        assert row["accuracy"] == pytest.approx(sum(p == e for p, e in zip(row["predictions"], expected,
                                                                           strict=True)) / 60)
        assert sum(map(sum, row["confusion"])) == 60
        assert [c["support"] for c in row["per_class"]] == report["class_counts"]
        assert 0 <= row["macro_f1"] <= 1
        assert (out / f"confusion_{row['name'].replace(' (', '-').rstrip(')')}.png").read_bytes()[:4] == b"\x89PNG"
    clf = report["rows"][1]
    assert clf["accuracy"] > report["majority_accuracy"] + 0.15  # the words that name each label are learnt
    assert clf["paired_vs_first"]["n"] == 60 and report["rows"][0]["paired_vs_first"] is None

    # The evaluation's classifier predictions are the head on each text's own states, no batch or padding.
    head, meta = load_head(tmp_path / "clf")
    dev = [json.loads(line) for line in (data_dir / "dev.jsonl").read_text().splitlines()]
    alone = []
    with torch.no_grad():
        for r in dev:
            ids = torch.tensor([meta.prompt_style.ids(r["text"], base.tokenizer)])
            alone.append(int(head(base.hidden_states(ids).last_hidden_state).argmax()))
    assert alone == clf["predictions"]

    md = (out / "report.md").read_text()
    assert "| last-layer GPT-2 124M | 0.462 | reference |" in md and "full GPT-2" in md
    assert "## clf: per label" in md and "majority label" in md
    (out / "report.md").unlink()
    evaluate.main(["--from-json", str(out / "report.json")])  # rendered again from the JSON alone
    assert (out / "report.md").read_text() == md


def test_a_classifier_evaluated_as_math_is_refused_by_name(data_dir: Path, tmp_path: Path, base: Base,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    head = ClassifierHead(ClassifierConfig(["negative", "positive"]), vocab_size=base.vocab_size, n_embd=base.n_embd)
    save_head(head, tmp_path / "clf", base.info(), task="sentiment")
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--base", str(EMBEDDED_BASE), "--heads", str(tmp_path / "clf"), "--data", str(data_dir),
                       "--out", str(tmp_path / "report"), "--task", "math"])
    assert exit_info.value.code == 2
    assert "a classifier head cannot generate; evaluate it with --task classify" in capsys.readouterr().err


def test_from_json_on_a_classify_file_that_is_no_report_exits_2(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "report.json").write_text('{"task": "classify", "rows": []}')
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--from-json", str(tmp_path / "report.json")])
    assert exit_info.value.code == 2 and "not a report written by training.evaluate" in capsys.readouterr().err
