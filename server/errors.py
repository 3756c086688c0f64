"""Typed domain errors. Routes and the engine raise these; `server.app` maps them to HTTP status.

Every message is shown to the client as the response's `detail`, so it must be readable and must
never contain a traceback or a server-side path the client did not send.
"""

from __future__ import annotations

from heads import BaseMismatchError, HeadFormatError
from heads.prompts import NoChatTemplateError


class ServerError(Exception):
    """Base class for errors whose message is safe to show to a client."""


class InvalidRequestError(ServerError):
    """The body is well formed but asks for something the server's limits do not allow."""


class InvalidHeadNameError(InvalidRequestError):
    """A head name outside `[a-z0-9][a-z0-9._-]{0,63}` (this also rules out path traversal)."""


class HeadKindError(InvalidRequestError):
    """The head's kind cannot do what the request asks: a classifier head generates no text (422, naming the
    kind and what the head is for)."""


class HeadNotFoundError(ServerError):
    """No head of that name in the registry."""


class HeadExistsError(ServerError):
    """Registering a name that is taken, without `replace=true`."""


class HeadUnavailableError(ServerError):
    """The registry holds a folder of that name, but it cannot be served (broken or for another base)."""


class HeadOutputError(HeadUnavailableError):
    """A head raised while decoding, or gave logits no token can be drawn from (NaN, infinity); only the
    requests decoding with it fail, and the message names the head."""


class GenerationFailedError(ServerError):
    """One request's own decoding failed inside the engine (say, turning its tokens into text); the rest of
    the batch went on. A server fault (500), but one whose message is safe and useful to show."""


class ClientDisconnectedError(ServerError):
    """The client went away before its answer was ready; its sequences were freed (nobody reads the 499)."""


class UploadTooLargeError(ServerError):
    """The upload body passed `MAX_UPLOAD_BYTES`."""


class QueueFullError(ServerError):
    """The engine's queue holds `MAX_QUEUE` waiting requests; the client should retry later."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReadyError(ServerError):
    """The base is still loading (or failed to load), or the server is shutting down."""


class AuthMissingError(ServerError):
    """An admin route was called without a bearer token."""


class AuthInvalidError(ServerError):
    """An admin route was called with the wrong bearer token."""


class WritesDisabledError(ServerError):
    """A registry write on a server without ADMIN_TOKEN that listens beyond loopback: safe by default."""


# The one place where domain errors become HTTP status codes (most specific class first).
STATUS_CODES: list[tuple[type[Exception], int]] = [
    (NoChatTemplateError, 400),  # chat messages, or a chat-format head, on a base without a chat template
    (InvalidRequestError, 422),
    (HeadNotFoundError, 404),
    (HeadExistsError, 409),
    (HeadOutputError, 409),  # the head's fault: neither the client's request nor the server's
    (HeadUnavailableError, 409),
    (BaseMismatchError, 409),  # an uploaded head trained on another base
    (HeadFormatError, 422),  # an uploaded head with malformed files
    (UploadTooLargeError, 413),
    (QueueFullError, 429),
    (NotReadyError, 503),
    (AuthMissingError, 401),
    (AuthInvalidError, 403),
    (GenerationFailedError, 500),  # a server fault whose message is still safe to show
    (ClientDisconnectedError, 499),  # nginx's "client closed request": only metrics and logs see it
    (WritesDisabledError, 403),
]


def status_for(error: BaseException) -> int:
    """The HTTP status of a domain error; 500 for anything else (a bug, never shown in detail)."""
    for cls, status in STATUS_CODES:
        if isinstance(error, cls):
            return status
    return 500


def is_mapped(error: BaseException) -> bool:
    """A domain error listed above; anything else that reaches a handler is a bug."""
    return any(isinstance(error, cls) for cls, _ in STATUS_CODES)


def public_detail(error: BaseException) -> str:
    """What a client may read about an error: the message of a mapped one, nothing about a bug."""
    return str(error) if is_mapped(error) else "internal server error"
