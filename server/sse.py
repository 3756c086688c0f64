"""Server-sent events framing shared by `/generate` and `/v1/completions`."""

from __future__ import annotations

import json
from typing import Any

# No caching, and no buffering by a proxy in front (nginx honours X-Accel-Buffering).
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(data: Any) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False, allow_nan=False)}\n\n".encode()


def sse_done() -> bytes:
    """The last event of every stream, as OpenAI's API ends its streams."""
    return b"data: [DONE]\n\n"
