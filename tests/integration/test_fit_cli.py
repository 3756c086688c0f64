import json

import pytest
import torch

from heads import WEIGHTS_NAME, load_head
from heads.base import load_base
from training import fit


def run_fit(base_dir, data_dir, out, *extra: str) -> None:
    fit.main(["--base", str(base_dir), "--data", str(data_dir), "--task", "math", "--out", str(out),
              "--epochs", "2", "--batch-size", "8", "--eval-every", "3", "--seed", "0", *extra])


def test_fit_writes_a_loadable_head_with_its_training_record(tiny_base_dir, synth_dir, tmp_path) -> None:
    out = tmp_path / "math"
    run_fit(tiny_base_dir, synth_dir, out, "--max-steps", "10")
    base = load_base(str(tiny_base_dir))
    head, meta = load_head(out, fingerprint=base.fingerprint, vocab_size=base.vocab_size, n_embd=base.n_embd)
    assert meta.task == "math" and meta.head_type == "backward_attention"
    assert meta.prompt_template == "Problem: {problem}\nSolution:"
    assert meta.base_fingerprint == base.fingerprint
    t = meta.training
    assert t["steps"] == 10 and t["seed"] == 0 and t["data"] == str(synth_dir)
    assert t["examples"] + t["held_out_examples"] == 64
    assert t["final_metrics"]["held_out_loss"] > 0 and t["tokens_per_s"] > 0
    assert t["hidden_pass"]["target_tokens"] > 0 and t["parameters"] == sum(p.numel() for p in head.parameters())
    assert t["final_metrics"]["base_held_out_loss"] > 0  # the base's own head on the same rows, for comparison
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_same_bytes_other_seed_other_bytes(tiny_base_dir, synth_dir, tmp_path) -> None:
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        run_fit(tiny_base_dir, synth_dir, tmp_path / name, "--max-steps", "6", "--seed", seed)
    a, b, c = ((tmp_path / n / WEIGHTS_NAME).read_bytes() for n in "abc")
    assert a == b
    assert a != c


def test_hidden_cache_trains_the_same_head(tiny_base_dir, synth_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HEADSERVE_CACHE_DIR", str(tmp_path / "cache"))
    run_fit(tiny_base_dir, synth_dir, tmp_path / "first", "--cache-hidden")
    run_fit(tiny_base_dir, synth_dir, tmp_path / "cached", "--cache-hidden")
    run_fit(tiny_base_dir, synth_dir, tmp_path / "plain", "--no-cache-hidden")
    cached, _ = load_head(tmp_path / "cached")
    plain, _ = load_head(tmp_path / "plain")
    for (name, p), q in zip(cached.state_dict().items(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-3, msg=name)
    first = json.loads((tmp_path / "first" / "head_config.json").read_text())["training"]["hidden_pass"]
    again = json.loads((tmp_path / "cached" / "head_config.json").read_text())["training"]["hidden_pass"]
    assert first["from_disk"] is False and first["pass_seconds"] > 0
    assert again["from_disk"] is True and again["target_tokens"] == first["target_tokens"]  # no second base pass
    assert sorted(p.name for p in (tmp_path / "cache" / "hidden").iterdir()) != []


def test_linear_kind_starts_from_the_base_lm_head(tiny_base_dir, synth_dir, tmp_path) -> None:
    run_fit(tiny_base_dir, synth_dir, tmp_path / "lin", "--kind", "linear", "--max-steps", "1", "--lr", "1e-9")
    head, meta = load_head(tmp_path / "lin")
    base = load_base(str(tiny_base_dir))
    assert meta.head_type == "linear"
    torch.testing.assert_close(head.proj.weight, base.embeddings, atol=1e-6, rtol=0)


def test_ctrl_c_leaves_the_previous_head_untouched(tiny_base_dir, synth_dir, tmp_path, monkeypatch) -> None:
    out = tmp_path / "math"
    run_fit(tiny_base_dir, synth_dir, out, "--max-steps", "2")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = {"n": 0}
    real_step = fit.train_step

    def interrupt_on_third_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(fit, "train_step", interrupt_on_third_step)
    with pytest.raises(SystemExit) as exit_info:
        run_fit(tiny_base_dir, synth_dir, out, "--seed", "7")
    assert exit_info.value.code == 130
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["math"]


def test_unreadable_data_exits_2_with_a_message(tiny_base_dir, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_fit(tiny_base_dir, tmp_path / "missing.jsonl", tmp_path / "h")
    assert exit_info.value.code == 2
    assert "missing.jsonl: no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "h").exists()


def test_fit_prints_what_it_wrote_and_the_commands_to_run_next(tiny_base_dir, synth_dir, tmp_path, capsys) -> None:
    out = tmp_path / "my-head"
    run_fit(tiny_base_dir, synth_dir, out, "--epochs", "1", "--max-steps", "2")
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {out}: backward_attention head for 'math', 2 steps")
    assert f"loss curve: {out / 'loss_curve.png'}" in printed
    assert f"-m training.evaluate --heads {out} --data {synth_dir} --out reports/my-head" in printed
    assert f"-m clients register {out} --name my-head" in printed
    assert "None" not in printed and "head " in printed and "target tokens/s" in printed


def test_fit_reports_the_base_pass_cost_then_that_it_was_read(tiny_base_dir, synth_dir, tmp_path, capsys,
                                                              monkeypatch) -> None:
    monkeypatch.setenv("HEADSERVE_CACHE_DIR", str(tmp_path / "cache"))
    run_fit(tiny_base_dir, synth_dir, tmp_path / "h")
    first = capsys.readouterr().out
    assert "base pass " in first and " tok/s)" in first
    run_fit(tiny_base_dir, synth_dir, tmp_path / "h2", "--kind", "linear")
    assert "base pass read from an earlier pass" in capsys.readouterr().out
