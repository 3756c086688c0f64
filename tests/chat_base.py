"""A chat base for tests: the embedded mini GPT-2 copied with a chat template added.

Same weights and config, so the same fingerprint: the committed heads serve on it. The template marks
roles with plain text and closes each turn with the tokenizer's own `<|endoftext|>` (its EOS).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from heads.base import EMBEDDED_BASE

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def make_chat_base(out: Path) -> Path:
    shutil.copytree(EMBEDDED_BASE, out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return out
