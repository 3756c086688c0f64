"""Reading `POST /generate` server-sent events (docs/api.md) into typed events, for both clients."""

from __future__ import annotations

import json

from clients.errors import error_for_status
from clients.types import GenerateResult, StreamToken


def event_from_line(line: str) -> StreamToken | GenerateResult | None:
    """A `data:` line -> a token, or the final result; None for [DONE], blank and unknown lines.

    An error event raises its typed exception, as the same error before the stream would have.
    """
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if payload == "[DONE]" or not payload:
        return None
    data = json.loads(payload)
    kind = data.get("type")
    if kind == "token":
        return StreamToken.from_json(data)
    if kind == "done":
        return GenerateResult.from_json(data["response"])
    if kind == "error":
        raise error_for_status(int(data.get("status", 500)), str(data.get("detail", "stream failed")))
    return None  # an event kind from a newer server
