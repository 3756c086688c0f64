"""Bounds on what a client controls, checked before the server pays for it.

A request's cost must be bounded by its size before anything is parsed, tokenised or allocated:
a body over `MAX_REQUEST_BYTES` is refused (413) from its `Content-Length` or while it streams in,
and a prompt whose characters cannot fit the token limit is refused without being tokenised.
"""

from __future__ import annotations

from typing import Any

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UPLOAD_ROUTE = ("POST", "/heads")  # multipart uploads keep their own, larger MAX_UPLOAD_BYTES


class BodyTooLargeError(HTTPException):
    """A request body over the limit.

    An HTTPException, not a domain error, because it is raised inside FastAPI's body reading,
    which re-raises HTTPExceptions as they are but turns anything else into a 400.
    """

    def __init__(self, limit: int, declared: int | None = None) -> None:
        size = f"{declared} bytes, " if declared is not None else ""
        super().__init__(413, f"the request body is {size}over the limit of {limit} bytes (MAX_REQUEST_BYTES)")


class BodyLimitMiddleware:
    """Cap every request body but the head upload's; checked before a byte is read, and while reading.

    The check sits in `receive`, so the route is already matched when it fails and the 413
    goes through the app's error handlers (same body shape, counted under its route).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope.get("method"), scope.get("path")) == UPLOAD_ROUTE:
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        seen, done = 0, False

        async def limited() -> Message:
            nonlocal seen, done
            if done:
                return await receive()  # the body is in; later calls only wait for a disconnect
            if declared is not None and declared > self.max_bytes:
                raise BodyTooLargeError(self.max_bytes, declared)
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLargeError(self.max_bytes)
                done = not message.get("more_body", False)
            return message

        await self.app(scope, limited, send)


def _content_length(scope: Scope) -> int | None:
    value = Headers(scope=scope).get("content-length", "")
    return int(value) if value.isdigit() else None


def longest_token_chars(tokenizer: Any) -> int:
    """The most characters of input one token can stand for, over the whole vocabulary.

    A prompt of n characters needs at least n / this many tokens, so a longer prompt than
    `token_limit * longest_token_chars` cannot fit and is refused without tokenising it. Sound for
    byte-level BPE (a token's vocabulary string has one character per byte it covers, and a character
    is at least one byte) and for SentencePiece pieces (a piece's string is the text it covers;
    a byte-fallback piece like `<0x41>` is longer than the one byte it covers). Special tokens
    count with their full text, since a prompt may spell them.
    """
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return max((len(t) for t in tokens if isinstance(t, str)), default=1) or 1


def prompt_char_limit(token_limit: int, tokenizer: Any) -> int:
    """The longest prompt, in characters, that could still encode to `token_limit` tokens or fewer."""
    return token_limit * longest_token_chars(tokenizer)
