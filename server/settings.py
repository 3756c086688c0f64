"""Server settings: environment variables with the `HEADSERVE_` prefix, overridable per app in tests.

Every value is checked when the settings are built, so a bad one stops the server at start-up
instead of surfacing as a strange answer to the first request that needs it.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from heads.base import EMBEDDED_BASE, IN_CHECKOUT, REPO_ROOT, check_base_location, default_base
from heads.base_sources import check_base, default_cache_dir
from heads.errors import BaseModelError
from server.classify_schemas import MAX_TEXTS

DEFAULT_MAX_PROMPT_TOKENS = 512
LOOPBACK_NAMES = {"localhost"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_heads_dir() -> Path:
    """The checkout's registry/ (what `make serve` serves); installed, ./registry in the working directory.

    A registry is written to (POST /heads, `headserve fit --out registry/NAME`), so an installed one never
    lives inside site-packages; `server.seed` fills a new one with the heads the package ships.
    """
    return REPO_ROOT / "registry" if IN_CHECKOUT else Path.cwd() / "registry"


class Settings(BaseSettings):
    # An empty variable counts as unset (the Dockerfile passes HEADSERVE_BASE_MODEL=${BASE}, empty by default).
    model_config = SettingsConfigDict(env_prefix="HEADSERVE_", extra="ignore", env_ignore_empty=True)

    # Where a GGUF base (a .gguf file, or an alias such as smollm2-135m-instruct) is converted once and then read
    # from; before base_model, whose check looks there. Default: XDG_CACHE_HOME or ~/.cache, then headserve/.
    cache_dir: Path = Field(default_factory=default_cache_dir)
    # HF hub id or local folder, a .gguf file, or an alias (heads.base_sources.ALIASES)
    base_model: str = Field(default_factory=default_base, validate_default=True)
    heads_dir: Path = Field(default_factory=default_heads_dir)  # the registry: one folder per head, the source of truth
    device: str = Field(default_factory=_default_device)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # half precision only makes sense on cuda
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    max_new_tokens: int = Field(default=256, ge=1)  # upper bound a request may ask for
    max_prompt_tokens: int | None = Field(default=None, ge=1)  # None: 512; always capped by the base context
    max_queue: int = Field(default=64, ge=1)  # requests waiting for the worker before 429
    max_batch_size: int = Field(default=32, ge=1)  # sequences per engine step (comparison decodes count)
    max_batch_tokens: int = Field(default=4096, ge=1)  # prompt + decode tokens per engine step
    max_classify_texts: int = Field(default=32, ge=1, le=MAX_TEXTS)  # texts in one POST /classify (each a queued job)
    head_cache_size: int = Field(default=8, ge=1)  # prepared heads kept on the device
    # A backward-attention head serves in factored form (KB resident, ms to load) until this use, then
    # its keys are materialised for the fastest decode; 1: materialise at load; 0: never.
    materialize_after: int = Field(default=2, ge=0)
    # When set, registering and deleting heads need it; unset, they are allowed only on a loopback host.
    admin_token: SecretStr | None = None
    max_upload_bytes: int = Field(default=512 * 1024 * 1024, ge=1)  # whole multipart body of POST /heads
    max_request_bytes: int = Field(default=1024 * 1024, ge=1024)  # any other request body (JSON routes): 413 above

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        try:
            torch.device(device)
        except (RuntimeError, ValueError):
            raise ValueError(f"{device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
        return device

    @field_validator("base_model")
    @classmethod
    def _base_usable(cls, base_model: str, info: ValidationInfo) -> str:
        # An install without its data, a missing .gguf file or an alias whose package is not installed would
        # otherwise start a server that answers /readyz 503 for ever. (A missing folder is left to the loader,
        # which says so on /readyz.)
        try:
            if Path(base_model) == EMBEDDED_BASE:
                check_base_location(base_model)
            else:
                check_base(base_model, info.data.get("cache_dir"))
        except BaseModelError as e:
            raise ValueError(str(e)) from None
        return base_model

    @field_validator("host")
    @classmethod
    def _host_given(cls, host: str) -> str:
        if not host.strip():
            raise ValueError("host must name an interface, e.g. 127.0.0.1 or 0.0.0.0")
        return host.strip()

    @field_validator("admin_token")
    @classmethod
    def _token_usable(cls, token: SecretStr | None) -> SecretStr | None:
        # An empty token would lock every write out (a bearer token is never empty), and one with
        # surrounding whitespace could never match the stripped header: refuse both up front.
        if token is not None:
            value = token.get_secret_value()
            if not value or value != value.strip():
                raise ValueError("admin_token must be non-empty without surrounding whitespace; unset it instead "
                                 "of leaving it empty")
        return token

    @model_validator(mode="after")
    def _half_precision_needs_cuda(self) -> Settings:
        if self.dtype != "float32" and not self.device.startswith("cuda"):
            raise ValueError(f"dtype {self.dtype} needs a cuda device, got device {self.device!r}")
        return self

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def listens_on_loopback(self) -> bool:
        """Whether only this machine can reach the server (127.0.0.0/8, ::1, localhost): the one place
        where registry writes without an admin token are safe."""
        return is_loopback(self.host)

    def prompt_token_limit(self, n_positions: int) -> int:
        """Longest formatted prompt accepted: the setting (or 512), leaving the base room for one token."""
        wanted = self.max_prompt_tokens or DEFAULT_MAX_PROMPT_TOKENS
        return max(1, min(wanted, n_positions - 1))


def is_loopback(host: str) -> bool:
    """A host name or address that only this machine can reach; names other than `localhost` are not resolved."""
    host = host.strip().strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings from the environment; tests build `Settings(...)` directly instead."""
    return Settings()
