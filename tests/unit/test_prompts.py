"""heads.prompts: one formatter for training and serving; chat prompts get one BOS and end at the turn's end."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from heads import BackwardAttentionConfig, BackwardAttentionHead, load_head, save_head
from heads.base import EMBEDDED_BASE
from heads.errors import HeadFormatError
from heads.prompts import (
    DEFAULT_PROMPT_TEMPLATE,
    TRAINING_PROMPT_TEMPLATE,
    NoChatTemplateError,
    PromptStyle,
    base_style,
    end_ids,
    training_style,
)
from heads.sampling import FinishReason, SamplingParams
from heads.storage import CONFIG_NAME, read_metadata
from server.sequence import Sequence
from training.data import Example, encode

# ChatML with the tokenizer's BOS in front, as Llama-style templates write it.
CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Plain-text markers that close a turn with the tokenizer's own EOS (what the integration tests serve).
MARKERS = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
           "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def tokenizer(chat_template: str | None = None, *, bos: bool = False, im_tokens: bool = False) -> Any:
    tok = AutoTokenizer.from_pretrained(EMBEDDED_BASE)
    if im_tokens:
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    if bos:
        tok.add_bos_token = True  # a tokenizer that puts BOS in front of whatever it encodes
    tok.chat_template = chat_template
    return tok


def test_plain_formatting_is_the_template_filled_and_tokenised_as_ever() -> None:
    tok = tokenizer(bos=True)
    style = PromptStyle(TRAINING_PROMPT_TEMPLATE)
    assert style.text("2 + 3?", tok) == "Problem: 2 + 3?\nSolution:"
    assert style.ids("2 + 3?", tok) == tok("Problem: 2 + 3?\nSolution:")["input_ids"]  # BOS included, as before
    for template in (TRAINING_PROMPT_TEMPLATE, "{problem} and {problem}", "no-op {problem}"):
        s = PromptStyle(template)
        assert s.filled_length(len("abcdef")) == len(s.fill("abcdef"))


def test_chat_ids_are_the_chat_templates_own_with_a_single_bos() -> None:
    tok = tokenizer(CHATML, bos=True, im_tokens=True)
    style = PromptStyle(DEFAULT_PROMPT_TEMPLATE, "chat")
    text = style.text("What is 2 + 3?", tok)
    assert text == "<|endoftext|><|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    own = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                  tokenize=True)["input_ids"]
    ids = style.ids("What is 2 + 3?", tok)
    assert ids == own
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert tok(text)["input_ids"][:2] == [tok.bos_token_id] * 2  # what tokenising it the plain way would do


def test_a_chat_style_puts_the_filled_template_in_the_user_message() -> None:
    tok = tokenizer(MARKERS)
    text = PromptStyle("Q: {problem}", "chat").text("hi", tok)
    assert text == "<|user|>\nQ: hi<|endoftext|>\n<|assistant|>\n"


def test_answers_end_at_the_templates_end_of_turn_token_and_at_eos() -> None:
    tok = tokenizer(CHATML, im_tokens=True)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end != tok.eos_token_id
    assert end_ids(tok, "chat") == (im_end, tok.eos_token_id)
    assert end_ids(tok, "plain") == (tok.eos_token_id,)
    assert end_ids(tokenizer(MARKERS), "chat") == (tok.eos_token_id,)  # the turn closes with EOS itself
    assert end_ids(tokenizer("{{ raise_exception('only users') }}"), "chat") == (tok.eos_token_id,)


def test_a_base_without_a_chat_template_refuses_chat_formatting() -> None:
    tok = tokenizer()
    with pytest.raises(NoChatTemplateError, match="no chat template"):
        PromptStyle(DEFAULT_PROMPT_TEMPLATE, "chat").text("hi", tok)
    with pytest.raises(NoChatTemplateError, match="--prompt-format plain"):
        training_style(tok, "chat")


def test_default_styles_follow_the_base() -> None:
    plain, chat = tokenizer(), tokenizer(MARKERS)
    assert base_style(plain) == PromptStyle(DEFAULT_PROMPT_TEMPLATE, "plain")
    assert base_style(chat) == PromptStyle(DEFAULT_PROMPT_TEMPLATE, "chat")
    assert training_style(plain) == PromptStyle(TRAINING_PROMPT_TEMPLATE, "plain")
    assert training_style(chat) == PromptStyle(DEFAULT_PROMPT_TEMPLATE, "chat")
    assert training_style(chat, "plain") == PromptStyle(TRAINING_PROMPT_TEMPLATE, "plain")
    assert training_style(chat, "auto", "Q: {problem}") == PromptStyle("Q: {problem}", "chat")
    with pytest.raises(ValueError, match="{problem}"):
        training_style(chat, "auto", "no slot")


def test_training_encodes_a_chat_example_as_prompt_ids_then_the_assistants_turn() -> None:
    tok = tokenizer(CHATML, bos=True, im_tokens=True)
    style = PromptStyle(DEFAULT_PROMPT_TEMPLATE, "chat")
    (ids, prompt_len), = encode([Example("2 + 3?", "2 + 3 = 5.", "5")], tok, 200, style)[0]
    assert ids[:prompt_len] == style.ids("2 + 3?", tok)
    target = ids[prompt_len:]
    assert target[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(target[:-1]) == "2 + 3 = 5.\nFinal answer: 5"  # no BOS, no leading space
    plain, _ = encode([Example("2 + 3?", "2 + 3 = 5.", "5")], tok, 200, TRAINING_PROMPT_TEMPLATE)
    assert plain[0][0][-1] == tok.eos_token_id and plain[0][0][:plain[0][1]] == tok("Problem: 2 + 3?\nSolution:")[
        "input_ids"]


def test_a_sequence_ends_at_any_end_token_unless_told_to_ignore_them() -> None:
    tok = tokenizer()

    def run(end: tuple[int, ...], ignore: bool) -> Sequence:
        seq = Sequence(decoder="greedy", head_label="base", head=None, params=SamplingParams(), generator=None,
                       max_new_tokens=3, end_ids=end, ignore_eos=ignore)
        for token in (72, 512, 73):
            if not seq.finished:
                seq.append(token, -0.5, 0.0, tok, tok.eos_token_id)
        return seq

    assert run((512,), False).reason == FinishReason.eos and run((512,), False).token_ids == [72, 512]
    assert run((), False).reason == FinishReason.length
    assert run((512,), True).reason == FinishReason.length and run((512,), True).token_ids == [72, 512, 73]


def _head() -> BackwardAttentionHead:
    return BackwardAttentionHead(BackwardAttentionConfig(latent_dim=8, num_heads=2), vocab_size=16, n_embd=8)


def test_a_chat_heads_metadata_round_trips(tmp_path: Path) -> None:
    saved = save_head(_head(), tmp_path / "h", {}, prompt_template="{problem}", prompt_format="chat")
    _, meta = load_head(tmp_path / "h")
    assert meta == saved and meta.prompt_format == "chat"
    assert meta.prompt_style == PromptStyle("{problem}", "chat")
    assert json.loads((tmp_path / "h" / CONFIG_NAME).read_text())["prompt_format"] == "chat"


def test_a_config_without_prompt_format_loads_as_plain(tmp_path: Path) -> None:
    save_head(_head(), tmp_path / "h", {}, prompt_template=TRAINING_PROMPT_TEMPLATE)
    path = tmp_path / "h" / CONFIG_NAME
    raw = json.loads(path.read_text())
    del raw["prompt_format"]  # a head written before the field existed
    path.write_text(json.dumps(raw))
    meta = read_metadata(tmp_path / "h")
    assert meta.prompt_style == PromptStyle(TRAINING_PROMPT_TEMPLATE, "plain")
    assert "prompt_format" in {f.name for f in dataclasses.fields(meta)}


@pytest.mark.parametrize("value", ["markdown", 1, None])
def test_an_unknown_prompt_format_is_refused_by_name(tmp_path: Path, value: object) -> None:
    save_head(_head(), tmp_path / "h", {})
    path = tmp_path / "h" / CONFIG_NAME
    raw = json.loads(path.read_text())
    raw["prompt_format"] = value
    path.write_text(json.dumps(raw))
    with pytest.raises(HeadFormatError, match="prompt_format must be one of"):
        load_head(tmp_path / "h")


def test_the_client_reads_a_heads_prompt_format() -> None:
    from clients.types import HeadSummary

    listed = {"name": "h", "type": "linear", "task": "math", "bytes": 1, "resident": False,
              "prompt_template": "{problem}", "base_model_name_or_path": None, "base_fingerprint": None,
              "created_at": None}
    assert HeadSummary.from_json({**listed, "prompt_format": "chat"}).prompt_format == "chat"
    assert HeadSummary.from_json(listed).prompt_format == "plain"  # a server from before the field
