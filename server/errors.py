"""Typed domain errors. Routes and the engine raise these; `server.app` maps them to HTTP status.

Every message is shown to the client as the response's `detail`, so it must be readable and must
never contain a traceback or a server-side path the client did not send.
"""

from __future__ import annotations

from heads import BaseMismatchError, HeadFormatError


class ServerError(Exception):
    """Base class for errors whose message is safe to show to a client."""


class InvalidRequestError(ServerError):
    """The body is well formed but asks for something the server's limits do not allow."""


class InvalidHeadNameError(InvalidRequestError):
    """A head name outside `[a-z0-9][a-z0-9._-]{0,63}` (this also rules out path traversal)."""


class HeadNotFoundError(ServerError):
    """No head of that name in the registry."""


class HeadExistsError(ServerError):
    """Registering a name that is taken, without `replace=true`."""


class HeadUnavailableError(ServerError):
    """The registry holds a folder of that name, but it cannot be served (broken or for another base)."""


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


# The one place where domain errors become HTTP status codes (most specific class first).
STATUS_CODES: list[tuple[type[Exception], int]] = [
    (InvalidRequestError, 422),
    (HeadNotFoundError, 404),
    (HeadExistsError, 409),
    (HeadUnavailableError, 409),
    (BaseMismatchError, 409),  # an uploaded head trained on another base
    (HeadFormatError, 422),  # an uploaded head with malformed files
    (UploadTooLargeError, 413),
    (QueueFullError, 429),
    (NotReadyError, 503),
    (AuthMissingError, 401),
    (AuthInvalidError, 403),
]


def status_for(error: BaseException) -> int:
    """The HTTP status of a domain error; 500 for anything else (a bug, never shown in detail)."""
    for cls, status in STATUS_CODES:
        if isinstance(error, cls):
            return status
    return 500


def public_detail(error: BaseException) -> str:
    """What a client may read about an error: the message of a mapped one, nothing about a bug."""
    return str(error) if status_for(error) != 500 else "internal server error"
