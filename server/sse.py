"""Server-sent events framing shared by `/generate`, `/v1/completions` and `/v1/chat/completions`."""

from __future__ import annotations

import json
from typing import Any

# No caching, and no buffering by a proxy in front (nginx honours X-Accel-Buffering).
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# How a route that answers JSON or, with `stream: true`, events documents its 200 in the OpenAPI schema.
STREAMING_RESPONSES: dict[int | str, dict[str, Any]] = {200: {
    "content": {"text/event-stream": {}},
    "description": "JSON, or server-sent events with `stream: true` (docs/api.md)"}}


def sse_event(data: Any) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False, allow_nan=False)}\n\n".encode()


def sse_done() -> bytes:
    """The last event of every stream, as OpenAI's API ends its streams."""
    return b"data: [DONE]\n\n"
