"""The captures REST resource: ``/api/v1/captures``.

Needs two things on ``app.state``: ``capture_store`` (a :class:`CaptureStore`)
and ``runs`` (the run registry: ``.get(run_id)`` returning a run with
``.model`` and ``.call_between_steps(fn, timeout)``, raising ``KeyError`` for
an unknown id). Limits are fixed when the router is built.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect
from starlette.types import Message as ASGIMessage

from ..history.heads import head_roles
from ..run_base import BaseRun
from . import formats
from .models import CaptureCreate, CaptureList, CapturePublic, Format, Message
from .service import CaptureLimits, create_capture, field_error
from .store import CaptureRecord, CaptureStore

logger = logging.getLogger(__name__)
PREFIX = "/api/v1/captures"


def get_store(request: Request) -> CaptureStore:
    """The app's capture store (503 when the app was started without one)."""
    store = getattr(request.app.state, "capture_store", None)
    if store is None:
        raise HTTPException(503, detail="captures are not available: the server has no store")
    return store


def get_runs(request: Request) -> Any:
    """The app's run registry."""
    runs = getattr(request.app.state, "runs", None)
    if runs is None:
        raise HTTPException(503, detail="captures are not available: the server has no runs")
    return runs


StoreDep = Annotated[CaptureStore, Depends(get_store)]
RunsDep = Annotated[Any, Depends(get_runs)]


def to_public(record: CaptureRecord) -> CapturePublic:
    """The API view of a stored capture."""
    meta = record.meta
    url = f"{PREFIX}/{record.id}"
    return CapturePublic(
        id=record.id, name=record.name, run=record.run, step=meta.get("step"),
        created=record.created, kinds=meta.get("kinds", []), layers=meta.get("layers", []),
        heads=meta.get("heads"), input=meta.get("input", {"kind": "tokens", "shape": []}),
        labels=meta.get("labels"), tensors=record.tensors, tensor_bytes=record.tensor_bytes,
        file_bytes=record.file_bytes, head_roles=meta.get("head_roles"),
        urls={"metadata": url, **{f: f"{url}/data?format={f}" for f in formats.MEDIA_TYPES}},
    )


def _not_found(capture_id: str) -> HTTPException:
    return HTTPException(404, detail=f"no capture with id {capture_id!r}")


def body_limited_route(max_bytes: int) -> type[APIRoute]:
    """A route class that answers 413 (JSON, naming the limit) to bodies over ``max_bytes``.

    The body is read in chunks and refused as soon as it passes the limit, so
    an oversized upload is never held in memory or parsed.
    """

    def too_large() -> JSONResponse:
        return JSONResponse({"detail": f"request body over the limit of {max_bytes} bytes "
                             "(captures_max_body_bytes)"}, status_code=413)

    class BodyLimitedRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def limited(request: Request) -> Response:
                declared = request.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > max_bytes:
                    return too_large()
                body = bytearray()
                try:
                    async for chunk in request.stream():
                        body += chunk
                        if len(body) > max_bytes:
                            return too_large()
                except ClientDisconnect:  # gone mid-body (or closed for stalling): nobody
                    return Response(status_code=400)  # reads this answer

                replayed = False

                async def replay() -> ASGIMessage:
                    nonlocal replayed
                    if replayed:
                        return await request.receive()
                    replayed = True
                    return {"type": "http.request", "body": bytes(body), "more_body": False}

                return await handler(Request(request.scope, replay))

            return limited

    return BodyLimitedRoute


def build_router(limits: CaptureLimits | None = None) -> APIRouter:
    """The captures router with ``limits`` (defaults: :class:`CaptureLimits`)."""
    limits = limits or CaptureLimits()
    router = APIRouter(prefix=PREFIX, tags=["captures"],
                       route_class=body_limited_route(limits.max_body_bytes))
    not_found = {404: {"model": Message, "description": "no such capture"}}

    @router.post(
        "", status_code=201, response_model=CapturePublic,
        responses={413: {"model": Message, "description": f"body over {limits.max_body_bytes} "
                         "bytes"},
                   409: {"model": Message, "description": "the run cannot capture now (a "
                         "remote run whose publisher is not connected)"},
                   502: {"model": Message, "description": "a remote run's publisher failed "
                         "or disconnected during the capture"},
                   503: {"model": Message, "description": "the run did not reach a step in time"}},
    )
    def create(body: CaptureCreate, store: StoreDep, runs: RunsDep,
               response: Response, request: Request) -> CapturePublic:
        """Capture what ``body`` asks for with one forward pass between training steps."""
        try:
            run: BaseRun = runs.get(body.run)
        except KeyError as exc:
            msg = getattr(exc, "message", None) or f"unknown run {body.run!r}"
            raise field_error(["run"], msg) from None
        roles = head_roles(getattr(request.app.state, "history", None), body.run)
        record = create_capture(body, run, store, limits,
                                None if roles is None else {"head_roles": roles})
        response.headers["Location"] = f"{PREFIX}/{record.id}"
        return to_public(record)

    @router.get("", response_model=CaptureList)
    def list_captures(
        store: StoreDep,
        run: Annotated[str | None, Query(max_length=200, description="only this run's")] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
    ) -> CaptureList:
        """Captures, newest first, a page at a time."""
        records, total = store.list(run=run, limit=limit, offset=offset)
        return CaptureList(items=[to_public(r) for r in records], total=total, limit=limit,
                           offset=offset)

    @router.get("/{capture_id}", response_model=CapturePublic, responses=not_found)
    def get_capture(capture_id: str, store: StoreDep) -> CapturePublic:
        """One capture's metadata: tensors, shapes, sizes, download URLs."""
        record = store.get(capture_id)
        if record is None:
            raise _not_found(capture_id)
        return to_public(record)

    binary = {"schema": {"type": "string", "format": "binary"}}
    data_responses: dict[int | str, dict[str, Any]] = {
        200: {"description": "the tensors in the asked format",
              "content": {"application/octet-stream": binary, "application/x-npz": binary,
                          "application/json": {"schema": {"type": "object"}}}},
        **not_found,
    }

    @router.get("/{capture_id}/data", response_class=StreamingResponse, responses=data_responses)
    def get_data(capture_id: str, store: StoreDep,
                 format: Annotated[Format, Query(description="npz, safetensors or json")] = "npz",
                 ) -> StreamingResponse:
        """Download the tensors: ``npz`` (np.load), ``safetensors`` or ``json`` (small only)."""
        opened = store.open(capture_id)
        if opened is None:
            raise _not_found(capture_id)
        record, f = opened
        if format == "json" and record.tensor_bytes > limits.max_json_bytes:
            f.close()
            raise HTTPException(422, detail=[{
                "loc": ["query", "format"], "type": "value_error",
                "msg": f"format=json is limited to captures of {limits.max_json_bytes} tensor "
                       f"bytes; this one has {record.tensor_bytes}: use format=npz or safetensors",
            }])
        if format == "npz":
            body, size = formats.encode_npz(f)
        elif format == "json":
            body, size = formats.encode_json(f, record)
        else:
            body, size = formats.encode_safetensors(f)
        name = formats.download_name(record, format)
        headers = {"Content-Disposition": f'attachment; filename="{name}"',
                   "Content-Length": str(size)}
        return StreamingResponse(body, media_type=formats.MEDIA_TYPES[format], headers=headers)

    @router.delete("/{capture_id}", status_code=204, response_class=Response,
                   responses=not_found)
    def delete_capture(capture_id: str, store: StoreDep) -> Response:
        """Delete a capture (its index row, then its file)."""
        if not store.delete(capture_id):
            raise _not_found(capture_id)
        return Response(status_code=204)

    return router
