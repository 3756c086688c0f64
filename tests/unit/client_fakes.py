"""A recorded mock transport and canned server answers for the client and CLI unit tests."""

from __future__ import annotations

import json
from typing import Any

import httpx

from clients import HeadserveClient

GENERATED: dict[str, Any] = {
    "text": " 12 + 7 = 19.", "tokens": 7, "finish_reason": "eos", "head": "math",
    "prompt": "Problem: What is 12 + 7?\nSolution:",
    "timings": {"queue_s": 0.001, "first_token_s": 0.01, "total_s": 0.2, "tokens_per_s": 35.0},
    "logprobs": [{"token_id": 123, "token": " 1", "logprob": -0.01}],
    "comparisons": [
        {"decoder": "linear_greedy", "text": " 19", "tokens": 2, "finish_reason": "eos",
         "timings": {"queue_s": 0.001, "first_token_s": 0.01, "total_s": 0.05, "tokens_per_s": 40.0}},
        {"decoder": "linear_top_k", "text": " 20 and more", "tokens": 4, "finish_reason": "length",
         "timings": {"queue_s": 0.001, "first_token_s": 0.01, "total_s": 0.1, "tokens_per_s": 40.0}},
    ],
}
SUMMARY = {
    "name": "math", "type": "backward_attention", "task": "math", "bytes": 1234, "resident": False,
    "prompt_template": "Problem: {problem}\nSolution:", "base_model_name_or_path": "models/mini-gpt2",
    "base_fingerprint": "ab" * 32, "created_at": "2024-01-01T00:00:00+00:00",
    "config": {"latent_dim": 16, "num_heads": 2}, "training": {"final_metrics": {"loss": 1.5}},
}


class Recorder:
    """A MockTransport handler that records every request and answers with a fixed response."""

    def __init__(self, status: int = 200, body: Any = None, headers: dict[str, str] | None = None,
                 content: bytes | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.status, self.body, self.headers, self.content = status, body, headers or {}, content

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        if self.content is not None:
            return httpx.Response(self.status, content=self.content, headers=self.headers)
        if self.body is None:
            return httpx.Response(self.status, headers=self.headers)
        return httpx.Response(self.status, json=self.body, headers=self.headers)

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]


def make_client(recorder: Recorder, **kwargs: Any) -> HeadserveClient:
    http = httpx.Client(transport=httpx.MockTransport(recorder), base_url="http://headserve.test")
    return HeadserveClient(http=http, **kwargs)


def sent_json(request: httpx.Request) -> Any:
    assert request.headers["content-type"] == "application/json"
    return json.loads(request.content)


def multipart_parts(request: httpx.Request) -> dict[str, tuple[str | None, str | None, bytes]]:
    """name -> (filename, content type, bytes) of a multipart/form-data body."""
    content_type = request.headers["content-type"]
    assert content_type.startswith("multipart/form-data; boundary=")
    boundary = content_type.split("boundary=", 1)[1].encode()
    parts: dict[str, tuple[str | None, str | None, bytes]] = {}
    for chunk in request.content.split(b"--" + boundary)[1:-1]:
        head, _, body = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        disposition = dict(p.strip().split("=", 1) for p in headers["Content-Disposition"].split(";")[1:])
        filename = disposition.get("filename", "").strip('"') or None
        parts[disposition["name"].strip('"')] = (filename, headers.get("Content-Type"), body.removesuffix(b"\r\n"))
    return parts
