"""The head registry over HTTP: register (multipart upload), list, describe, delete."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator

from fastapi import APIRouter, Depends, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from heads import HeadMetadata
from heads.registry import get_head_type
from server.errors import HeadNotFoundError, HeadUnavailableError, InvalidRequestError, UploadTooLargeError
from server.metrics import UNKNOWN_LABEL
from server.registry import HeadEntry, check_name
from server.schemas import HEAD_NAME_PATTERN, HeadList, HeadSummary
from server.state import (
    MetricsDep,
    RegistryDep,
    Runtime,
    RuntimeDep,
    SettingsDep,
    require_admin,
    resident_heads,
    set_head_label,
)

log = logging.getLogger(__name__)
router = APIRouter(tags=["heads"])

FORM_FIELDS = {"name", "config", "weights"}
# The body is parsed by hand (bounded while it streams in), so FastAPI cannot infer it: declared here for
# /docs, generated clients and the schema fuzz.
UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["name", "config", "weights"], "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": HEAD_NAME_PATTERN, "description": "the head's name"},
        "config": {"type": "string", "format": "binary", "description": "head_config.json"},
        "weights": {"type": "string", "format": "binary", "description": "head.safetensors"},
    }}}}}}


def summarize(entry: HeadEntry, resident: set[str], served_fingerprint: str | None) -> HeadSummary:
    """A ready head in full; an invalid or incompatible one with its reason and whatever its config still tells
    (an incompatible one with both fingerprints: the base it was made for, and the one served here)."""
    status = entry.status
    meta = entry.meta
    if meta is None:
        return HeadSummary(name=entry.name, status=status, error=entry.error, bytes=entry.bytes, resident=False)
    return HeadSummary(name=entry.name, status=status, error=entry.error, type=meta.head_type, task=meta.task,
                       bytes=entry.bytes, resident=entry.name in resident, prompt_template=meta.prompt_template,
                       prompt_format=meta.prompt_format,
                       base_model_name_or_path=meta.base_model_name_or_path, base_fingerprint=meta.base_fingerprint,
                       created_at=meta.created_at, config=meta.config, training=meta.training,
                       served_base_fingerprint=served_fingerprint if entry.incompatible else None,
                       generative=get_head_type(meta.head_type).generative, labels=_labels(meta))


def _labels(meta: HeadMetadata) -> list[str] | None:
    """The labels a head classifies into by itself: a verbalizer's, or a classifier's (its config names them)."""
    if meta.labels is not None:
        return list(meta.labels)
    labels = meta.config.get("labels") if not get_head_type(meta.head_type).generative else None
    return [str(label) for label in labels] if isinstance(labels, list) else None


@router.post("/heads", status_code=201, response_model=HeadSummary, dependencies=[Depends(require_admin)],
             openapi_extra=UPLOAD_BODY)
async def register_head(request: Request, runtime: RuntimeDep, registry: RegistryDep, settings: SettingsDep,
                        replace: bool = False) -> HeadSummary:
    """Validate the upload in memory as a load would (files, sizes, base, logits on probe states), then
    write it atomically (201). Nothing is written unless it passed; concurrent writers of one name are
    serialised, each getting 201 or 409."""
    form = await _read_form(request, settings.max_upload_bytes)
    name = form.get("name")
    if not isinstance(name, str):
        raise InvalidRequestError("form field 'name' is required and must be text")
    set_head_label(request, UNKNOWN_LABEL)  # the name becomes a label once it is registered
    registry.check_free(check_name(name), replace)
    files = {}
    for field in ("config", "weights"):
        upload = form.get(field)
        if not isinstance(upload, UploadFile):
            raise InvalidRequestError(f"form field {field!r} is required and must be a file")
        files[field] = await upload.read()
    meta = await asyncio.wrap_future(runtime.head_cache.check_upload(files["config"], files["weights"]))
    entry = await run_in_threadpool(lambda: registry.register(name, files["config"], files["weights"], meta,
                                                              replace=replace))
    runtime.head_cache.registered(entry)  # a replaced head must never be served from its old copy
    set_head_label(request, name)
    return summarize(entry, set(), registry.served_fingerprint)


@router.get("/heads", response_model=HeadList)
def list_heads(request: Request, registry: RegistryDep) -> HeadList:
    """Every head on disk now (hand-copied ones included); one that cannot be served is listed `invalid`
    with its reason (and logged once by the registry)."""
    resident = resident_heads(request)
    heads = []
    for name in registry.names():
        try:
            heads.append(summarize(registry.inspect(name), resident, registry.served_fingerprint))
        except (HeadNotFoundError, HeadUnavailableError):  # deleted while we listed, or replaced through every read
            continue
    return HeadList(heads=heads)


@router.get("/heads/{name}", response_model=HeadSummary)
def get_head(name: str, request: Request, registry: RegistryDep) -> HeadSummary:
    """The head's summary, 200 for an invalid one too (its `error` says why); 404 if there is none."""
    set_head_label(request, UNKNOWN_LABEL)
    entry = registry.inspect(check_name(name))
    set_head_label(request, name)  # a folder of that name is in the registry
    return summarize(entry, resident_heads(request), registry.served_fingerprint)


@router.delete("/heads/{name}", status_code=204, dependencies=[Depends(require_admin)])
def delete_head(name: str, request: Request, registry: RegistryDep, metrics: MetricsDep) -> Response:
    """Remove the head from disk, the cache and the metrics; a request already generating with it still finishes.

    The request itself stays labelled `unknown`: the name is no longer registered once it is answered.
    """
    set_head_label(request, UNKNOWN_LABEL)
    registry.delete(name)
    runtime: Runtime | None = request.app.state.runtime
    if runtime is not None:
        runtime.head_cache.discard(name)
    metrics.forget_head(name)
    return Response(status_code=204)


async def _read_form(request: Request, limit: int) -> FormData:
    """Parse the multipart body, refusing (413) as soon as more than `limit` bytes have arrived."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequestError("POST /heads takes multipart/form-data with the fields name, config and weights")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise UploadTooLargeError(f"upload of {int(declared)} bytes is over the limit of {limit} bytes")

    async def limited() -> AsyncGenerator[bytes, None]:
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                raise UploadTooLargeError(f"upload is over the limit of {limit} bytes")
            yield chunk

    parser = MultiPartParser(request.headers, limited(), max_files=2, max_fields=1)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise InvalidRequestError(f"malformed multipart body: {e.message}") from None
    unknown = sorted(set(form.keys()) - FORM_FIELDS)
    if unknown:
        raise InvalidRequestError(f"unknown form fields {unknown}; expected name, config and weights")
    return form
