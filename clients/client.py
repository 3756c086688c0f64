"""Sync and async HTTP clients for a headserve server (docs/api.md).

Both clients share everything but the I/O: each public method builds a `_Call` (method, path,
body, how to parse the answer) with the module-level builders below, and the client only sends
it. Errors come back as the typed exceptions of `clients.errors`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, Protocol, TypeVar
from urllib.parse import quote

import httpx

from clients.errors import HeadserveConnectionError, HeadserveError, error_for
from clients.streaming import event_from_line
from clients.types import ClassifyResult, GenerateResult, HeadSummary, Readiness, StreamToken

DEFAULT_URL = "http://127.0.0.1:8000"
# Generation can take a while on a CPU; connecting should not.
DEFAULT_TIMEOUT = httpx.Timeout(120.0, connect=5.0)
# The head folder's file names (the same constants as heads.storage; clients/ must not import heads/).
CONFIG_NAME = "head_config.json"
WEIGHTS_NAME = "head.safetensors"

Strategy = Literal["greedy", "top_k", "top_p"]
CompareDecoder = Literal["greedy", "top_k"]
TimeoutTypes = float | httpx.Timeout | None

_UNSET: Any = object()  # "not given", distinct from timeout=None (no timeout)
R = TypeVar("R")  # what a call's answer parses to


class SyncHTTP(Protocol):
    """What the client needs of a caller's HTTP client: `httpx.Client`, or one with its API.

    FastAPI's TestClient qualifies; on Starlette 1.x it subclasses `httpx2.Client` (httpx's API
    under another package name), not `httpx.Client`. Transport errors are turned into
    HeadserveConnectionError only for httpx's own exceptions.
    """

    @property
    def base_url(self) -> Any: ...

    def request(self, method: str, url: Any, *, data: Any = ..., files: Any = ..., json: Any = ...,
                params: Any = ..., headers: Any = ..., timeout: Any = ...) -> Any: ...

    def stream(self, method: str, url: Any, *, json: Any = ..., headers: Any = ..., timeout: Any = ...) -> Any: ...

    def close(self) -> None: ...


class AsyncHTTP(Protocol):
    """The async counterpart of SyncHTTP: `httpx.AsyncClient` or one with its API."""

    @property
    def base_url(self) -> Any: ...

    async def request(self, method: str, url: Any, *, data: Any = ..., files: Any = ..., json: Any = ...,
                      params: Any = ..., headers: Any = ..., timeout: Any = ...) -> Any: ...

    def stream(self, method: str, url: Any, *, json: Any = ..., headers: Any = ..., timeout: Any = ...) -> Any: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class _Call(Generic[R]):
    """One HTTP exchange, described independently of sync/async I/O."""

    method: str
    path: str
    parse: Callable[[Any], R]  # the 2xx httpx.Response -> the typed result
    json: Any = None
    params: dict[str, str] | None = None
    data: dict[str, str] | None = None
    files: dict[str, tuple[str, bytes, str]] | None = None


def _generate_body(prompt: str, head: str | None = None, *, max_new_tokens: int | None = None,
                   strategy: Strategy | None = None, top_k: int | None = None, top_p: float | None = None,
                   temperature: float | None = None, seed: int | None = None,
                   stop: str | Sequence[str] | None = None,
                   compare: bool | CompareDecoder | Sequence[CompareDecoder] = False, raw: bool = False,
                   return_logprobs: bool = False, ignore_eos: bool = False) -> dict[str, Any]:
    """The JSON body of `POST /generate`; options left at None/False are omitted so server defaults apply."""
    body: dict[str, Any] = {"prompt": prompt}
    if head is not None:
        body["head"] = head
    if max_new_tokens is not None:
        body["max_new_tokens"] = max_new_tokens
    decoding = {k: v for k, v in (("strategy", strategy), ("top_k", top_k), ("top_p", top_p),
                                  ("temperature", temperature), ("seed", seed)) if v is not None}
    if decoding:
        body["decoding"] = decoding
    if stop is not None:
        body["stop"] = [stop] if isinstance(stop, str) else list(stop)
    if compare:
        body["compare"] = True if compare is True else [compare] if isinstance(compare, str) else list(compare)
    if raw:
        body["raw"] = True
    if return_logprobs:
        body["return_logprobs"] = True
    if ignore_eos:
        body["ignore_eos"] = True
    return body


def _classify_call(text: str | Sequence[str], head: str | None, label_words: Sequence[str] | None,
                   truncate: bool) -> _Call[ClassifyResult]:
    """`POST /classify`: one text (a str) or several (any other sequence of str), in one request."""
    body: dict[str, Any] = {"text": text} if isinstance(text, str) else {"texts": list(text)}
    if head is not None:
        body["head"] = head
    if label_words is not None:
        body["label_words"] = list(label_words)
    if truncate:
        body["truncate"] = True
    return _Call("POST", "/classify", lambda r: ClassifyResult.from_json(r.json()), json=body)


def _head_path(name: str) -> str:
    return "/heads/" + quote(name, safe="")


def _stream_call(prompt: str, head: str | None, **options: Any) -> _Call[None]:
    return _Call("POST", "/generate", lambda r: None, json={**_generate_body(prompt, head, **options), "stream": True})


def _generate_call(prompt: str, head: str | None, **options: Any) -> _Call[GenerateResult]:
    return _Call("POST", "/generate", lambda r: GenerateResult.from_json(r.json()),
                 json=_generate_body(prompt, head, **options))


def _register_call(head_dir: str | os.PathLike[str], name: str | None, replace: bool) -> _Call[HeadSummary]:
    folder = Path(head_dir)
    files: dict[str, tuple[str, bytes, str]] = {}
    for field, filename, mime in (("config", CONFIG_NAME, "application/json"),
                                  ("weights", WEIGHTS_NAME, "application/octet-stream")):
        path = folder / filename
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (a head folder holds {CONFIG_NAME} and {WEIGHTS_NAME})")
        files[field] = (filename, path.read_bytes(), mime)
    name = name or folder.resolve().name
    return _Call("POST", "/heads", lambda r: HeadSummary.from_json(r.json()), data={"name": name}, files=files,
                 params={"replace": "true"} if replace else None)


def _list_heads_call() -> _Call[list[HeadSummary]]:
    return _Call("GET", "/heads", lambda r: [HeadSummary.from_json(h) for h in r.json()["heads"]])


def _get_head_call(name: str) -> _Call[HeadSummary]:
    return _Call("GET", _head_path(name), lambda r: HeadSummary.from_json(r.json()))


def _delete_head_call(name: str) -> _Call[None]:
    return _Call("DELETE", _head_path(name), lambda r: None)


def _health_call() -> _Call[dict[str, Any]]:
    return _Call("GET", "/healthz", lambda r: r.json())


def _ready_call() -> _Call[Readiness]:
    return _Call("GET", "/readyz", lambda r: Readiness.from_json(r.json()))


def _metrics_call() -> _Call[str]:
    return _Call("GET", "/metrics", lambda r: r.text)


class _ClientBase:
    """Configuration and request/response handling shared by both clients."""

    def __init__(self, base_url: str | None, token: str | None, timeout: TimeoutTypes,
                 http: SyncHTTP | AsyncHTTP | None) -> None:
        self._token = token
        self._owns_http = http is None
        # Our own client carries base_url and timeout; a caller's client keeps its own unless we are told otherwise.
        self._prefix = base_url.rstrip("/") if (http is not None and base_url) else ""
        self._timeout_kw: dict[str, Any] = {} if timeout is _UNSET or self._owns_http else {"timeout": timeout}
        self.base_url = base_url or (str(http.base_url) if http is not None else DEFAULT_URL)

    @staticmethod
    def _client_kwargs(base_url: str | None, timeout: TimeoutTypes) -> dict[str, Any]:
        """Settings for the httpx client we create (and close) ourselves."""
        return {"base_url": base_url or DEFAULT_URL, "timeout": DEFAULT_TIMEOUT if timeout is _UNSET else timeout}

    def _request_kwargs(self, call: _Call[Any]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"json": call.json, "params": call.params, "data": call.data, "files": call.files}
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if self._token:
            kwargs["headers"] = {"Authorization": f"Bearer {self._token}"}
        return {**kwargs, **self._timeout_kw}

    def _transport_error(self, exc: httpx.TransportError) -> HeadserveError:
        what = "timed out talking to" if isinstance(exc, httpx.TimeoutException) else "cannot reach"
        return HeadserveConnectionError(f"{what} {self.base_url}: {exc or type(exc).__name__}")

    @staticmethod
    def _finish(call: _Call[R], response: Any) -> R:
        """Raise the typed error of a non-2xx answer, else parse it (`response` is an httpx.Response or alike)."""
        if response.status_code >= 400:
            raise error_for(response)
        return call.parse(response)


class HeadserveClient(_ClientBase):
    """Blocking client. Pass `http=` to reuse an `httpx.Client` (e.g. FastAPI's TestClient); it is not closed here."""

    def __init__(self, base_url: str | None = None, *, token: str | None = None, timeout: TimeoutTypes = _UNSET,
                 http: SyncHTTP | None = None) -> None:
        super().__init__(base_url, token, timeout, http)
        self._http: SyncHTTP = http if http is not None else httpx.Client(**self._client_kwargs(base_url, timeout))

    def _send(self, call: _Call[R]) -> R:
        try:
            response = self._http.request(call.method, self._prefix + call.path, **self._request_kwargs(call))
        except httpx.TransportError as e:
            raise self._transport_error(e) from e
        return self._finish(call, response)

    def generate(self, prompt: str, head: str | None = None, *, max_new_tokens: int | None = None,
                 strategy: Strategy | None = None, top_k: int | None = None, top_p: float | None = None,
                 temperature: float | None = None, seed: int | None = None, stop: str | Sequence[str] | None = None,
                 compare: bool | CompareDecoder | Sequence[CompareDecoder] = False, raw: bool = False,
                 return_logprobs: bool = False, ignore_eos: bool = False) -> GenerateResult:
        """Generate with `head` (None: the base's own LM head); `compare` adds the base's linear decodes."""
        return self._send(_generate_call(
            prompt, head, max_new_tokens=max_new_tokens, strategy=strategy, top_k=top_k, top_p=top_p,
            temperature=temperature, seed=seed, stop=stop, compare=compare, raw=raw, return_logprobs=return_logprobs,
            ignore_eos=ignore_eos))

    def generate_stream(self, prompt: str, head: str | None = None,
                        **options: Any) -> Iterator[StreamToken | GenerateResult]:
        """`generate` token by token: yields a StreamToken per token of every decoder, then the GenerateResult.

        Takes the same options as `generate`. Leaving the loop early closes the connection, and the
        server frees the request's batch slot at its next step.
        """
        call = _stream_call(prompt, head, **options)
        kwargs = self._request_kwargs(call)
        try:
            with self._http.stream(call.method, self._prefix + call.path, **kwargs) as response:
                if response.status_code >= 400:
                    response.read()
                    raise error_for(response)
                for line in response.iter_lines():
                    event = event_from_line(line)
                    if event is not None:
                        yield event
        except httpx.TransportError as e:
            raise self._transport_error(e) from e

    def classify(self, text: str | Sequence[str], head: str | None = None, *,
                 label_words: Sequence[str] | None = None, truncate: bool = False) -> ClassifyResult:
        """Label probabilities of one text (a str) or several (a list), with a classifier head, or with a
        generative head (or the base: `head` None) scored on `label_words`' first tokens. `truncate`: a text
        past the server's prompt limit keeps its last tokens instead of a 422."""
        return self._send(_classify_call(text, head, label_words, truncate))

    def register_head(self, head_dir: str | os.PathLike[str], name: str | None = None, *,
                      replace: bool = False) -> HeadSummary:
        """Upload a head folder under `name` (default: the folder's name); `replace` overwrites an existing one."""
        return self._send(_register_call(head_dir, name, replace))

    def list_heads(self) -> list[HeadSummary]:
        return self._send(_list_heads_call())

    def get_head(self, name: str) -> HeadSummary:
        return self._send(_get_head_call(name))

    def delete_head(self, name: str) -> None:
        self._send(_delete_head_call(name))

    def health(self) -> dict[str, Any]:
        return self._send(_health_call())

    def ready(self) -> Readiness:
        """The server's readiness; raises NotReadyError (503) until the base is loaded and warmed up."""
        return self._send(_ready_call())

    def metrics_text(self) -> str:
        """`GET /metrics` in Prometheus text format."""
        return self._send(_metrics_call())

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> HeadserveClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncHeadserveClient(_ClientBase):
    """Asyncio client with the same methods as HeadserveClient, awaited. `http=` takes an `httpx.AsyncClient`."""

    def __init__(self, base_url: str | None = None, *, token: str | None = None, timeout: TimeoutTypes = _UNSET,
                 http: AsyncHTTP | None = None) -> None:
        super().__init__(base_url, token, timeout, http)
        self._http: AsyncHTTP = (http if http is not None
                                 else httpx.AsyncClient(**self._client_kwargs(base_url, timeout)))

    async def _send(self, call: _Call[R]) -> R:
        try:
            response = await self._http.request(call.method, self._prefix + call.path, **self._request_kwargs(call))
        except httpx.TransportError as e:
            raise self._transport_error(e) from e
        return self._finish(call, response)

    async def generate(self, prompt: str, head: str | None = None, *, max_new_tokens: int | None = None,
                       strategy: Strategy | None = None, top_k: int | None = None, top_p: float | None = None,
                       temperature: float | None = None, seed: int | None = None,
                       stop: str | Sequence[str] | None = None,
                       compare: bool | CompareDecoder | Sequence[CompareDecoder] = False, raw: bool = False,
                       return_logprobs: bool = False, ignore_eos: bool = False) -> GenerateResult:
        return await self._send(_generate_call(
            prompt, head, max_new_tokens=max_new_tokens, strategy=strategy, top_k=top_k, top_p=top_p,
            temperature=temperature, seed=seed, stop=stop, compare=compare, raw=raw, return_logprobs=return_logprobs,
            ignore_eos=ignore_eos))

    async def generate_stream(self, prompt: str, head: str | None = None,
                              **options: Any) -> AsyncIterator[StreamToken | GenerateResult]:
        """The async `HeadserveClient.generate_stream`."""
        call = _stream_call(prompt, head, **options)
        kwargs = self._request_kwargs(call)
        try:
            async with self._http.stream(call.method, self._prefix + call.path, **kwargs) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise error_for(response)
                async for line in response.aiter_lines():
                    event = event_from_line(line)
                    if event is not None:
                        yield event
        except httpx.TransportError as e:
            raise self._transport_error(e) from e

    async def classify(self, text: str | Sequence[str], head: str | None = None, *,
                       label_words: Sequence[str] | None = None, truncate: bool = False) -> ClassifyResult:
        return await self._send(_classify_call(text, head, label_words, truncate))

    async def register_head(self, head_dir: str | os.PathLike[str], name: str | None = None, *,
                            replace: bool = False) -> HeadSummary:
        return await self._send(_register_call(head_dir, name, replace))

    async def list_heads(self) -> list[HeadSummary]:
        return await self._send(_list_heads_call())

    async def get_head(self, name: str) -> HeadSummary:
        return await self._send(_get_head_call(name))

    async def delete_head(self, name: str) -> None:
        await self._send(_delete_head_call(name))

    async def health(self) -> dict[str, Any]:
        return await self._send(_health_call())

    async def ready(self) -> Readiness:
        return await self._send(_ready_call())

    async def metrics_text(self) -> str:
        return await self._send(_metrics_call())

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncHeadserveClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
