"""POST /generate on a tiny base, checked against independent computations of the same decodes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient

from heads import BackwardAttentionConfig, BackwardAttentionHead, LinearHead, load_head, save_head
from heads.base import Base, load_base
from server.app import create_app
from server.settings import Settings
from tests.integration.ready import wait_ready
from training.decoding import generate as reference_generate

TEMPLATE = "Problem: {problem}\nSolution:"
MAX_NEW = 32


@pytest.fixture(scope="module")
def base(lively_base_dir: Path) -> Base:
    return load_base(str(lively_base_dir))


@pytest.fixture(scope="module")
def heads_dir(base: Base, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("registry")
    torch.manual_seed(0)
    math_head = BackwardAttentionHead(BackwardAttentionConfig(latent_dim=16, residual=False),
                                      vocab_size=base.vocab_size, n_embd=base.n_embd)
    save_head(math_head, root / "math", base.info(), task="math", prompt_template=TEMPLATE)
    copy = LinearHead(vocab_size=base.vocab_size, n_embd=base.n_embd).init_from(base.embeddings)
    save_head(copy, root / "copy", base.info(), task="math", prompt_template=TEMPLATE)
    return root


@pytest.fixture(scope="module")
def client(lively_base_dir: Path, heads_dir: Path) -> Iterator[TestClient]:
    settings = Settings(base_model=str(lively_base_dir), heads_dir=heads_dir, device="cpu", max_new_tokens=MAX_NEW)
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


def post(client: TestClient, **body: Any) -> dict[str, Any]:
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def reference(base: Base, text: str, max_new_tokens: int, head: Any = None, **kw: Any) -> Any:
    return reference_generate(base, [base.tokenizer(text)["input_ids"]], head=head, max_new_tokens=max_new_tokens,
                              **kw)[0]


def test_base_head_uses_the_prompt_verbatim_and_matches_the_reference_decoder(client: TestClient,
                                                                               base: Base) -> None:
    out = post(client, prompt="Ava has 3 apples", max_new_tokens=12)
    ref = reference(base, "Ava has 3 apples", 12)
    assert out["head"] is None and out["prompt"] == "Ava has 3 apples"
    assert out["text"] == ref.text and out["tokens"] == ref.n_tokens == 12
    assert out["finish_reason"] == ref.finish_reason == "length"
    assert len(set(out["text"])) > 3  # the decode is not one repeated token
    assert out["logprobs"] is None and out["comparisons"] is None
    t = out["timings"]
    assert 0 <= t["queue_s"] <= t["first_token_s"] <= t["total_s"] and t["tokens_per_s"] > 0


def test_a_head_formats_the_prompt_with_its_template_unless_raw(client: TestClient, base: Base,
                                                                heads_dir: Path) -> None:
    head, _ = load_head(heads_dir / "math", fingerprint=base.fingerprint)
    out = post(client, prompt="What is 2 + 3?", head="math", max_new_tokens=10)
    assert out["head"] == "math" and out["prompt"] == "Problem: What is 2 + 3?\nSolution:"
    assert out["text"] == reference(base, out["prompt"], 10, head=head).text
    assert out["text"] != reference(base, out["prompt"], 10).text  # the head, not the base, chose the tokens
    raw = post(client, prompt="What is 2 + 3?", head="math", max_new_tokens=10, raw=True)
    assert raw["prompt"] == "What is 2 + 3?"
    assert raw["text"] == reference(base, "What is 2 + 3?", 10, head=head).text


def test_compare_true_decodes_the_same_prompt_with_the_base_linear_head(client: TestClient) -> None:
    decoding = {"strategy": "top_p", "top_p": 0.8, "top_k": 20, "temperature": 0.7, "seed": 3}
    out = post(client, prompt="Sam buys 4 pens", head="math", max_new_tokens=10, compare=True, decoding=decoding)
    assert [c["decoder"] for c in out["comparisons"]] == ["linear_greedy", "linear_top_k"]
    formatted = "Problem: Sam buys 4 pens\nSolution:"
    greedy = post(client, prompt=formatted, raw=True, max_new_tokens=10)
    top_k = post(client, prompt=formatted, raw=True, max_new_tokens=10,
                 decoding={"strategy": "top_k", "top_k": 20, "temperature": 0.7, "seed": 3})
    by_name = {c["decoder"]: c for c in out["comparisons"]}
    assert by_name["linear_greedy"]["text"] == greedy["text"]
    assert by_name["linear_top_k"]["text"] == top_k["text"]
    assert by_name["linear_top_k"]["tokens"] == top_k["tokens"] == 10
    assert by_name["linear_greedy"]["finish_reason"] == greedy["finish_reason"]


def test_compare_list_and_a_copy_of_the_base_head_agree(client: TestClient) -> None:
    out = post(client, prompt="Ben has 12 books", head="copy", max_new_tokens=12, compare=["greedy"])
    assert [c["decoder"] for c in out["comparisons"]] == ["linear_greedy"]
    assert out["comparisons"][0]["text"] == out["text"]  # a copy of the LM head decodes exactly like it
    only_top_k = post(client, prompt="Ben has 12 books", max_new_tokens=4, compare=["top_k"])
    assert [c["decoder"] for c in only_top_k["comparisons"]] == ["linear_top_k"]


def test_greedy_is_deterministic(client: TestClient) -> None:
    first = post(client, prompt="Tom had 9 marbles", head="math", max_new_tokens=16)
    again = post(client, prompt="Tom had 9 marbles", head="math", max_new_tokens=16)
    assert first["text"] == again["text"] and first["tokens"] == again["tokens"]


@pytest.mark.parametrize("decoding", [{"strategy": "top_k", "top_k": 40}, {"strategy": "top_p", "top_p": 0.9}])
def test_seeded_sampling_repeats_and_other_seeds_differ(client: TestClient, decoding: dict[str, Any]) -> None:
    def run(seed: int) -> str:
        return post(client, prompt="Mia counts", head="math", max_new_tokens=16,  # type: ignore[no-any-return]
                    decoding={**decoding, "seed": seed})["text"]

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_stop_string_ends_generation_and_is_trimmed(client: TestClient) -> None:
    decoding = {"strategy": "top_k", "top_k": 50, "seed": 5}
    full = post(client, prompt="Kim reads", max_new_tokens=24, decoding=decoding)
    assert full["finish_reason"] == "length"
    text = full["text"]
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].isascii() and text[i:i + 2].strip())
    out = post(client, prompt="Kim reads", max_new_tokens=24, decoding=decoding, stop=["never-there", stop])
    assert out["finish_reason"] == "stop"
    assert out["text"] == text[:text.find(stop)]
    assert stop not in out["text"]
    assert out["tokens"] < full["tokens"]


def test_sequences_of_one_request_finish_independently(client: TestClient) -> None:
    """The answer stops early while the comparisons go on: rows leave the shared cache one by one."""
    decoding = {"strategy": "top_k", "top_k": 50, "seed": 9}
    full = post(client, prompt="Eve buys 7 pens", head="math", max_new_tokens=20, decoding=decoding)["text"]
    stop = next(full[i:i + 2] for i in range(2, len(full) - 2) if full[i:i + 2].isascii() and full[i:i + 2].strip())
    out = post(client, prompt="Eve buys 7 pens", head="math", max_new_tokens=20, decoding=decoding, stop=[stop],
               compare=True)
    assert out["finish_reason"] == "stop" and out["text"] == full[:full.find(stop)]
    formatted = "Problem: Eve buys 7 pens\nSolution:"
    alone = {
        "linear_greedy": post(client, prompt=formatted, raw=True, max_new_tokens=20, stop=[stop]),
        "linear_top_k": post(client, prompt=formatted, raw=True, max_new_tokens=20, stop=[stop], decoding=decoding),
    }
    for comparison in out["comparisons"]:
        expected = alone[comparison["decoder"]]
        assert (comparison["text"], comparison["tokens"]) == (expected["text"], expected["tokens"])
        assert comparison["finish_reason"] == expected["finish_reason"]
    assert max(c["tokens"] for c in out["comparisons"]) > out["tokens"]


def test_max_new_tokens_ends_with_length(client: TestClient) -> None:
    out = post(client, prompt="Lee", head="math", max_new_tokens=3, return_logprobs=True)
    assert out["tokens"] == 3 and out["finish_reason"] == "length" and len(out["logprobs"]) == 3


def test_max_new_tokens_defaults_to_64_capped_by_the_setting(client: TestClient, base: Base) -> None:
    out = post(client, prompt="Lee")
    assert out["tokens"] == MAX_NEW == reference(base, "Lee", MAX_NEW).n_tokens  # the setting (32) is below 64


def test_logprobs_match_a_full_forward_pass(client: TestClient, base: Base) -> None:
    out = post(client, prompt="Zoe has 5 cats", max_new_tokens=8, return_logprobs=True)
    lp = out["logprobs"]
    assert len(lp) == out["tokens"] == 8
    assert all(item["logprob"] <= 0 for item in lp)
    prompt_ids = base.tokenizer("Zoe has 5 cats")["input_ids"]
    ids = prompt_ids + [item["token_id"] for item in lp]
    with torch.no_grad():
        logits = base.model(torch.tensor([ids])).logits[0]  # (T, V)
    expected = F.log_softmax(logits[len(prompt_ids) - 1: -1], dim=-1)  # (8, V): each step's distribution
    want = expected.gather(-1, torch.tensor(ids[len(prompt_ids):])[:, None]).squeeze(-1)
    assert torch.allclose(torch.tensor([item["logprob"] for item in lp]), want, atol=1e-4)
    assert [item["token"] for item in lp] == [base.tokenizer.decode([item["token_id"]]) for item in lp]


def test_sampled_logprobs_are_valid(client: TestClient) -> None:
    out = post(client, prompt="Ray", head="math", max_new_tokens=6, return_logprobs=True,
               decoding={"strategy": "top_k", "top_k": 5, "temperature": 2.0, "seed": 1})
    assert len(out["logprobs"]) == out["tokens"] == 6
    assert all(-20 < item["logprob"] <= 0 for item in out["logprobs"])


@pytest.mark.parametrize(("body", "field"), [
    ({"prompt": "x", "color": "red"}, "color"),
    ({"prompt": "x", "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": MAX_NEW + 1}, "max_new_tokens"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   \n"}, "prompt"),
    ({"max_new_tokens": 4}, "prompt"),
    ({"prompt": "x", "decoding": {"strategy": "nucleus"}}, "strategy"),
    ({"prompt": "x", "decoding": {"top_k": 0}}, "top_k"),
    ({"prompt": "x", "decoding": {"top_p": 1.5}}, "top_p"),
    ({"prompt": "x", "decoding": {"temperature": 0}}, "temperature"),
    ({"prompt": "x", "decoding": {"seed": -1}}, "seed"),
    ({"prompt": "x", "stop": ["a"] * 9}, "stop"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "compare": ["beam"]}, "compare"),
    ({"prompt": "x", "head": "../etc"}, "head"),
    ({"prompt": "1 + 1 = 2. " * 200}, "limit"),
])
def test_invalid_bodies_are_422_with_a_readable_detail(client: TestClient, body: dict[str, Any], field: str) -> None:
    r = client.post("/generate", json=body)
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert isinstance(detail, str) and field in detail


def test_malformed_json_is_422(client: TestClient) -> None:
    r = client.post("/generate", content=b'{"prompt": "x",', headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert "not valid JSON" in r.json()["detail"]


def test_prompt_over_the_limit_counts_the_template(client: TestClient, base: Base) -> None:
    limit = base.n_positions - 1  # the default 512 is capped by the tiny base's 256 positions
    words = "1 + "
    n = next(k for k in range(1, 400) if len(base.tokenizer(words * k)["input_ids"]) > limit - 8)
    raw_len = len(base.tokenizer(words * n)["input_ids"])
    assert raw_len <= limit
    assert client.post("/generate", json={"prompt": words * n, "max_new_tokens": 1}).status_code == 200
    r = client.post("/generate", json={"prompt": words * n, "head": "math", "max_new_tokens": 1})
    assert r.status_code == 422 and f"limit is {limit}" in r.json()["detail"]


def test_unknown_head_is_404(client: TestClient) -> None:
    r = client.post("/generate", json={"prompt": "x", "head": "nope"})
    assert r.status_code == 404
    assert r.json() == {"detail": "no head named 'nope'"}
