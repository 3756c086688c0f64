"""Typed errors: one exception class per HTTP status the server documents (docs/api.md)."""

from __future__ import annotations

import email.utils
import time

import httpx


class HeadserveError(Exception):
    """Base of every client error. `status_code` is None when no HTTP response arrived."""

    def __init__(self, detail: str, status_code: int | None = None) -> None:
        self.detail = detail
        self.status_code = status_code
        super().__init__(f"{status_code}: {detail}" if status_code is not None else detail)


class HeadserveConnectionError(HeadserveError):
    """The server could not be reached, or did not answer in time."""


class InvalidRequestError(HeadserveError):
    """422: malformed body, unknown field, out-of-range value, empty or too long prompt, bad head name."""


class UnauthorizedError(HeadserveError):
    """401: an admin route was called without `Authorization: Bearer <token>`."""


class ForbiddenError(HeadserveError):
    """403: the admin token was wrong, or registry writes are disabled (a server beyond loopback without a token)."""


class HeadNotFoundError(HeadserveError):
    """404: no head (or route) by that name."""


class ConflictError(HeadserveError):
    """409: head name taken, or the head was trained on another base."""


class PayloadTooLargeError(HeadserveError):
    """413: the upload is over the server's limit."""


class QueueFullError(HeadserveError):
    """429: the server's queue is full; `retry_after` is the server's hint in seconds (None if absent)."""

    def __init__(self, detail: str, status_code: int | None = 429, retry_after: float | None = None) -> None:
        super().__init__(detail, status_code)
        self.retry_after = retry_after


class NotReadyError(HeadserveError):
    """503: the base model is not loaded and warmed up yet."""


class ServerError(HeadserveError):
    """Any other 5xx: the server failed."""


_BY_STATUS: dict[int, type[HeadserveError]] = {
    401: UnauthorizedError, 403: ForbiddenError, 404: HeadNotFoundError, 409: ConflictError,
    413: PayloadTooLargeError, 422: InvalidRequestError, 503: NotReadyError,
}


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` as seconds: either delta-seconds or an HTTP date; None when absent or unreadable."""
    if value is None or not value.strip():
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _detail(response: httpx.Response) -> str:
    """The readable message of an error body; tolerates FastAPI's list-shaped validation details."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or response.reason_phrase or f"HTTP {response.status_code}"
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):  # [{"loc": [...], "msg": "..."}, ...]
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
                parts.append(f"{loc}: {item.get('msg', item)}" if loc else str(item.get("msg", item)))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return str(detail if detail is not None else body)


def error_for(response: httpx.Response) -> HeadserveError:
    """The typed exception for a non-2xx response."""
    return error_for_status(response.status_code, _detail(response), response.headers.get("retry-after"))


def error_for_status(status: int, detail: str, retry_after: str | None = None) -> HeadserveError:
    """The typed exception for a status and detail (an error response, or an error event mid-stream)."""
    if status == 429:
        return QueueFullError(detail, status, parse_retry_after(retry_after))
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else HeadserveError)
    return cls(detail, status)
