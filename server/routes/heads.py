"""The head registry over HTTP: register (multipart upload), list, describe, delete."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator

from fastapi import APIRouter, Depends, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from server.errors import HeadNotFoundError, HeadUnavailableError, InvalidRequestError, UploadTooLargeError
from server.registry import Registry, check_name
from server.schemas import HeadList, HeadSummary
from server.state import RegistryDep, Runtime, RuntimeDep, SettingsDep, require_admin, resident_heads, set_head_label

log = logging.getLogger(__name__)
router = APIRouter(tags=["heads"])

FORM_FIELDS = {"name", "config", "weights"}


def summarize(registry: Registry, name: str, resident: set[str]) -> HeadSummary:
    meta = registry.metadata(name)
    return HeadSummary(name=name, type=meta.head_type, task=meta.task, bytes=registry.size_bytes(name),
                       resident=name in resident, prompt_template=meta.prompt_template,
                       base_model_name_or_path=meta.base_model_name_or_path, base_fingerprint=meta.base_fingerprint,
                       created_at=meta.created_at, config=meta.config, training=meta.training)


@router.post("/heads", status_code=201, response_model=HeadSummary, dependencies=[Depends(require_admin)])
async def register_head(request: Request, runtime: RuntimeDep, registry: RegistryDep, settings: SettingsDep,
                        replace: bool = False) -> HeadSummary:
    """Validate the upload against the loaded base in memory, then write it atomically (201)."""
    form = await _read_form(request, settings.max_upload_bytes)
    name = form.get("name")
    if not isinstance(name, str):
        raise InvalidRequestError("form field 'name' is required and must be text")
    set_head_label(request, check_name(name))
    files = {}
    for field in ("config", "weights"):
        upload = form.get(field)
        if not isinstance(upload, UploadFile):
            raise InvalidRequestError(f"form field {field!r} is required and must be a file")
        files[field] = await upload.read()
    base = runtime.base
    await run_in_threadpool(lambda: registry.register(name, files["config"], files["weights"],
                                                      fingerprint=base.fingerprint, vocab_size=base.vocab_size,
                                                      n_embd=base.n_embd, replace=replace))
    runtime.head_cache.discard(name)  # a replaced head must never be served from its old copy
    return summarize(registry, name, runtime.head_cache.resident())


@router.get("/heads", response_model=HeadList)
def list_heads(request: Request, registry: RegistryDep) -> HeadList:
    """Every usable head on disk now (hand-copied ones included); broken folders are logged and skipped."""
    resident = resident_heads(request)
    heads = []
    for name in registry.names():
        try:
            heads.append(summarize(registry, name, resident))
        except HeadNotFoundError:  # deleted while we listed
            continue
        except HeadUnavailableError as e:
            log.warning("skipping %s", e)
    return HeadList(heads=heads)


@router.get("/heads/{name}", response_model=HeadSummary)
def get_head(name: str, request: Request, registry: RegistryDep) -> HeadSummary:
    set_head_label(request, check_name(name))
    return summarize(registry, name, resident_heads(request))


@router.delete("/heads/{name}", status_code=204, dependencies=[Depends(require_admin)])
def delete_head(name: str, request: Request, registry: RegistryDep) -> Response:
    """Remove the head from disk and the cache; a request already generating with it still finishes."""
    set_head_label(request, check_name(name))
    registry.delete(name)
    runtime: Runtime | None = request.app.state.runtime
    if runtime is not None:
        runtime.head_cache.discard(name)
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
