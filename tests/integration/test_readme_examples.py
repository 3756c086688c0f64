"""The answers README.md and docs/api.md show for their example prompts are what the server returns.

The examples use the committed `math` head on the embedded base, greedy, so the text is exact. If a
retrained head or base changes an answer, this test names the example to update.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from heads.base import EMBEDDED_BASE, REPO_ROOT
from server.app import create_app
from server.settings import Settings
from tests.integration.ready import wait_ready

PROBLEM = "Hana gets 4 bags with 32 apples each, uses 33 of them, then gets 10 more. How many apples does Hana have?"
HEAD_ANSWER = (" The bags hold 4 * 32 = 128. After using 33, 128 - 33 = 95. Getting 10 more gives 95 + 10 = 105. "
               "The answer is 105.")
BASE_GREEDY = (" had gives away 32 of 32 apples. The answer is 32. How many apples does Tara have now? Tara gives away "
               "32 apples and buys 10 more, so 32 + 10 = 42. The answer is 42.")
RAW_PAIR, RAW_ANSWER = "37 + 86 =", " 123"  # a pair held out of the base's corpus


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    heads = tmp_path_factory.mktemp("readme") / "heads"
    shutil.copytree(REPO_ROOT / "registry", heads)
    settings = Settings(base_model=str(EMBEDDED_BASE), heads_dir=heads, device="cpu")
    with TestClient(create_app(settings)) as client:
        wait_ready(client, timeout=60)
        yield client


@pytest.mark.parametrize("doc", ["README.md", "docs/api.md"])
def test_the_docs_show_these_examples(doc: str) -> None:
    text = (REPO_ROOT / doc).read_text()
    assert PROBLEM in text and "The answer is 105." in text
    # The old default for the math head, which it answers with garbage (SmolLM2's chat examples may ask it).
    assert '"prompt": "What is 12 + 7?"' not in text and "Problem: What is 12 + 7?" not in text


def test_readme_math_head_example(client: TestClient) -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    out = client.post("/generate", json={"prompt": PROBLEM, "head": "math", "compare": True, "max_new_tokens": 64,
                                         "stop": ["\n"]}).json()
    assert out["text"] == HEAD_ANSWER and out["finish_reason"] == "stop"
    greedy = next(c for c in out["comparisons"] if c["decoder"] == "linear_greedy")
    assert greedy["text"] == BASE_GREEDY  # the base's own head gets it wrong, as the docs say
    assert "The answer is 105." in readme and "The answer is 32." in readme
    api = (REPO_ROOT / "docs" / "api.md").read_text()
    assert f'"text": "{HEAD_ANSWER}"' in api and BASE_GREEDY in api


def test_readme_raw_base_example(client: TestClient) -> None:
    out = client.post("/generate", json={"prompt": RAW_PAIR, "raw": True, "max_new_tokens": 8, "stop": ["\n"],
                                         "decoding": {"strategy": "top_p", "top_p": 0.9, "temperature": 0.8,
                                                      "seed": 1}}).json()
    assert out["text"] == RAW_ANSWER
    assert f'"prompt": "{RAW_PAIR}"' in (REPO_ROOT / "README.md").read_text()
    assert f'("text": "{RAW_ANSWER}")' in (REPO_ROOT / "README.md").read_text()

