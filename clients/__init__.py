"""Python client and CLI for a headserve server; depends only on httpx and the stdlib.

```python
from clients import HeadserveClient

with HeadserveClient("http://127.0.0.1:8000") as client:
    result = client.generate("Hana gets 4 bags with 32 apples each, uses 33 of them, then gets 10 more. "
                             "How many apples does Hana have?", head="math", compare=True, stop=["\n"])
    print(result.text, result.finish_reason, [c.text for c in result.comparisons or []])
```
"""

from clients.client import DEFAULT_URL, AsyncHeadserveClient, HeadserveClient
from clients.errors import (
    ConflictError,
    ForbiddenError,
    HeadNotFoundError,
    HeadserveConnectionError,
    HeadserveError,
    InvalidRequestError,
    NotReadyError,
    PayloadTooLargeError,
    QueueFullError,
    ServerError,
    UnauthorizedError,
)
from clients.types import (
    Classification,
    ClassifyResult,
    Comparison,
    GenerateResult,
    HeadSummary,
    Readiness,
    StreamToken,
    Timings,
    TokenLogprob,
)

__all__ = [
    "DEFAULT_URL", "AsyncHeadserveClient", "Classification", "ClassifyResult", "Comparison", "ConflictError",
    "ForbiddenError", "GenerateResult", "HeadNotFoundError", "HeadSummary", "HeadserveClient",
    "HeadserveConnectionError", "HeadserveError", "InvalidRequestError", "NotReadyError", "PayloadTooLargeError",
    "QueueFullError", "Readiness", "ServerError", "StreamToken", "Timings", "TokenLogprob", "UnauthorizedError",
]
