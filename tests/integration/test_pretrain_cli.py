import json

from transformers import AutoModelForCausalLM, AutoTokenizer

from heads.base import load_base
from training import pretrain


def test_pretrain_writes_a_loadable_hf_folder_with_provenance(tmp_path) -> None:
    out = tmp_path / "mini"
    pretrain.main(["--out", str(out), "--steps", "3", "--arith", "400", "--problems", "60", "--n-layer", "1",
                   "--n-embd", "32", "--n-head", "2", "--vocab-size", "300", "--eval-pairs", "10",
                   "--batch-size", "4"])
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["steps"] == 3 and provenance["held_out"]["addition_pairs_scored"] == 10
    assert 0 <= provenance["held_out"]["addition_accuracy"] <= 1
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert [tokenizer.decode([i]) for i in tokenizer("12 + 345")["input_ids"]][:2] == ["1", "2"]  # digit tokens
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.n_layer == 1 and len(tokenizer) == model.config.vocab_size
    assert load_base(str(out)).fingerprint.startswith("sha256:")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_held_out_pairs_never_reach_the_corpus() -> None:
    held = pretrain.held_out_pairs(0)
    assert len(held) == 1000
    lines = pretrain.build_corpus(0, 3000, 10, held)
    seen = {tuple(int(x) for x in line.split(" = ")[0].split(" + ")) for line in lines
            if " + " in line and line.count(" ") == 4}
    assert seen and not seen & held
