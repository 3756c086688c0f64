"""The project as a user installs it: a wheel built from this tree, installed into a fresh virtualenv, run
from a directory outside the source tree.

Why: everything else imports the checkout, where `models/` and `registry/` sit next to the code. Only an
install proves that the wheel carries the embedded base and the committed heads, that `headserve` is on
the PATH, and that an installed server writes its registry outside site-packages. Dependencies come from
the test's own environment (a `.pth` line), so nothing is downloaded and torch is not installed twice.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import headserve
from bench.server_proc import free_port
from clients import HeadserveClient, HeadserveError
from tests.shipped import made_for, shipped_heads

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 60.0  # a generous "became ready instead of hanging" bound: it takes about 5 s
SOURCE = ["pyproject.toml", "README.md", "LICENSE", "headserve", "heads", "runtime", "server", "training", "clients",
          "bench", "models", "registry"]  # what the wheel is built from (tests/unit/test_packaging.py checks this list)


@dataclass
class Install:
    venv: Path
    site: Path  # the venv's site-packages, where the wheel went
    workdir: Path  # an empty directory outside the source tree, where commands run
    env: dict[str, str]

    def headserve(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.venv / "bin" / "headserve"), *args], cwd=self.workdir, env=self.env,
                              capture_output=True, text=True, timeout=timeout)


def _data_files(site: Path) -> dict[str, int]:
    """The wheel's data (base and heads) in site-packages, with each file's mtime: what a server must leave alone."""
    return {str(p.relative_to(site)): p.stat().st_mtime_ns for sub in ("models", "registry")
            for p in (site / "headserve" / sub).rglob("*")}


def _run(*cmd: str | Path, cwd: Path) -> None:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Install]:
    root = tmp_path_factory.mktemp("install")
    source = root / "source"  # a copy, so the build writes nothing (build/, *.egg-info) into the checkout
    for name in SOURCE:
        src = REPO_ROOT / name
        if src.is_dir():
            shutil.copytree(src, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(src, source / name)
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--wheel-dir", root / "dist", ".", cwd=source)
    wheel = next((root / "dist").glob("headserve-*.whl"))
    venv = root / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=root)
    _run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-deps", "--no-index",
         wheel, cwd=root)
    ask = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", ask], capture_output=True, text=True,
                               check=True).stdout.strip())
    # After the install, so pip never saw the test environment's own (editable) headserve there.
    deps = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (site / "zz-test-dependencies.pth").write_text("".join(f"{d}\n" for d in sorted(deps)))
    workdir = root / "work"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("HEADSERVE_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HOME=str(root), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    yield Install(venv, site, workdir, env)


def test_the_installed_command_reports_the_version_and_imports_the_wheel(installed: Install) -> None:
    done = installed.headserve("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"headserve {headserve.__version__}"
    where = subprocess.run(
        [str(installed.venv / "bin" / "python"), "-c",
         "import heads, server, importlib.metadata as m; print(heads.__file__); print(m.version('headserve'))"],
        cwd=installed.workdir, env=installed.env, capture_output=True, text=True, check=True).stdout.split()
    assert Path(where[0]).is_relative_to(installed.site)  # the wheel's code, not the checkout's
    assert where[1] == headserve.__version__  # the wheel's metadata carries the one version


def test_an_installed_server_serves_the_packaged_base_and_heads(installed: Install) -> None:
    shipped = _data_files(installed.site)
    port = free_port()
    log = installed.workdir.parent / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(installed.venv / "bin" / "headserve"), "serve", "--port", str(port)],
                                cwd=installed.workdir, env=installed.env, stdout=out, stderr=subprocess.STDOUT)
    try:
        with HeadserveClient(f"http://127.0.0.1:{port}", timeout=30.0) as client:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                assert proc.poll() is None, f"the server exited:\n{log.read_text(errors='replace')}"
                try:
                    ready = client.ready()
                    break
                except HeadserveError:
                    assert time.monotonic() < deadline, f"not ready in time:\n{log.read_text(errors='replace')}"
                    time.sleep(0.3)
            assert ready.base == "models/mini-gpt2"  # named as in the heads' metadata, wherever it is installed
            heads = {h.name: h.status for h in client.list_heads()}
            # The SmolLM2 heads are shipped too: made for SmolLM2, so listed (not served) on the embedded base.
            assert heads == {name: "ready" if made_for(name) == "models/mini-gpt2" else "incompatible"
                             for name in shipped_heads()}
            result = client.generate("Dan has 87 buttons. Dan buys 5 more buttons. How many buttons does Dan have now?",
                                     head="math", max_new_tokens=4)
            assert result.head == "math" and result.tokens == 4  # the packaged head decodes
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # The registry was created where the server started, as a copy of the shipped heads; site-packages
    # was only read.
    registry = installed.workdir / "registry"
    heads = shipped_heads()
    assert sorted(p.name for p in registry.iterdir()) == heads
    for name in heads:
        assert (registry / name / "head.safetensors").read_bytes() == \
            (REPO_ROOT / "registry" / name / "head.safetensors").read_bytes()
    assert _data_files(installed.site) == shipped


def test_an_install_without_its_data_refuses_to_start_saying_what_to_do(installed: Install) -> None:
    models = installed.site / "headserve" / "models"
    models.rename(models.with_name("models.away"))
    try:
        done = installed.headserve("serve", "--port", str(free_port()))
    finally:
        models.with_name("models.away").rename(models)
    assert done.returncode == 2
    message = done.stderr.strip().splitlines()
    assert len(message) == 1, done.stderr
    assert "embedded base not found at" in message[0] and "HEADSERVE_BASE_MODEL" in message[0]
    assert str(models / "mini-gpt2") in message[0]
