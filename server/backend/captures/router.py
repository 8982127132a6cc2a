"""The captures REST resource: ``/api/v1/captures``.

Needs two things on ``app.state``: ``capture_store`` (a :class:`CaptureStore`)
and ``runs`` (the run registry: ``.get(run_id)`` returning a
:class:`~attnscope.core.run_base.BaseRun`, raising ``UnknownRunError`` for an unknown id).
Limits are fixed when the router is built. Besides the tensors' downloads, a capture
is served as the page draws it: one layer as a binary frame (``/{id}/frame``) and
every head's statistics and role (``/{id}/heads``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.types import Message as ASGIMessage

from ...contract.protocol import encode_frame
from ...core.capture import CaptureError
from ...core.roles import ROLES
from ...core.run_base import BaseRun, UnknownRunError
from ..history.heads import head_roles
from . import formats
from .models import (
    CaptureCreate,
    CaptureHeads,
    CaptureInput,
    CaptureList,
    CapturePublic,
    Format,
    Message,
)
from .requests import CaptureLimits, CaptureRejected, create_capture, field_error, input_of
from .store import CaptureRecord, CaptureStore
from .views import FRAME_KINDS, capture_frame, capture_heads, captured_heads, pick_heads

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
        text=meta.get("text"), pin=meta.get("pin"),
        urls={"metadata": url, **{f: f"{url}/data?format={f}" for f in formats.MEDIA_TYPES}},
    )


def _not_found(capture_id: str) -> HTTPException:
    return HTTPException(404, detail=f"no capture with id {capture_id!r}")


def http_error(exc: CaptureRejected) -> HTTPException:
    """A refused capture as the HTTP answer."""
    return HTTPException(exc.status, detail=exc.detail)


def run_of(runs: Any, run_id: str) -> BaseRun:
    """The run ``run_id`` of the registry, or 422 naming the known ones."""
    try:
        return runs.get(run_id)
    except UnknownRunError as exc:
        raise field_error(["run"], exc.message) from None


def _query_error(field: str, msg: str) -> HTTPException:
    return HTTPException(422, detail=[{"loc": ["query", field], "msg": msg,
                                       "type": "value_error"}])


async def _disconnected(request: Request) -> None:
    """Return once the client has hung up (its request body is read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


_orphans: set[asyncio.Future] = set()  # captures whose client left: deleted when they land


async def unless_cancelled(request: Request, store: CaptureStore,
                           work: Callable[[], CaptureRecord]) -> CaptureRecord | None:
    """``work()`` in a worker thread; None when the client hung up first (the page's
    Cancel). The capture then still runs at the run's next step boundary (it is queued
    there), and what it stores is deleted when it lands."""
    done = asyncio.ensure_future(run_in_threadpool(work))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if done.done():
        return done.result()
    _orphans.add(done)

    def drop(future: asyncio.Future) -> None:
        _orphans.discard(future)
        if not future.cancelled() and future.exception() is None:
            store.delete(future.result().id)
            logger.info("capture %s: its client left before it came; deleted",
                        future.result().id)

    done.add_done_callback(drop)
    return None


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
    async def create(body: CaptureCreate, store: StoreDep, runs: RunsDep,
                     response: Response, request: Request) -> Any:
        """Capture what ``body`` asks for with one forward pass between training steps.
        A client that hangs up before it comes gets nothing stored."""
        try:
            run = run_of(runs, body.run)
        except CaptureRejected as exc:
            raise http_error(exc) from None
        roles = head_roles(getattr(request.app.state, "history", None), body.run)

        def work() -> CaptureRecord:
            return create_capture(body, run, store, limits,
                                  None if roles is None else {"head_roles": roles})

        try:
            record = await unless_cancelled(request, store, work)
        except CaptureRejected as exc:
            raise http_error(exc) from None
        if record is None:  # nobody is listening: any answer will do
            return Response(status_code=499)
        response.headers["Location"] = f"{PREFIX}/{record.id}"
        return to_public(record)

    @router.get("/input", response_model=CaptureInput)
    def capture_input(run: Annotated[str, Query(min_length=1, max_length=200)],
                      runs: RunsDep) -> CaptureInput:
        """What input a capture of ``run`` takes: text, token ids, features, or none (then
        ``message`` says why)."""
        try:
            return CaptureInput(**input_of(runs.get(run), limits))
        except UnknownRunError as exc:
            raise _query_error("run", exc.message) from None

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

    frame_responses: dict[int | str, dict[str, Any]] = {
        200: {"description": "a binary frame (docs/protocol.md)",
              "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                  "format": "binary"}}}},
        **not_found,
    }

    @router.get("/{capture_id}/frame", response_class=Response, responses=frame_responses)
    def get_frame(capture_id: str, store: StoreDep,
                  layer: Annotated[int, Query(ge=0, le=65535)] = 0,
                  kind: Annotated[str, Query(description="attention or qk_logits")] = "attention",
                  heads: Annotated[str | None, Query(
                      max_length=65536, description="comma-separated head indices (default all)",
                  )] = None,
                  sample: Annotated[int, Query(ge=0, le=65535)] = 0,
                  max_side: Annotated[int, Query(ge=4, le=1024)] = 128) -> Response:
        """One layer of a capture as a binary frame of docs/protocol.md (float16, pooled to
        ``max_side``, the capture's token labels): what the page draws."""
        record = store.get(capture_id)
        if record is None:
            raise _not_found(capture_id)
        if kind not in FRAME_KINDS:
            raise _query_error("kind", f"kind must be one of {list(FRAME_KINDS)}")
        name = f"{kind}.{layer}"
        if name not in record.tensors:
            held = sorted(k for k in record.tensors if k.split(".")[0] in FRAME_KINDS)
            raise _query_error("layer" if kind in record.meta.get("kinds", []) else "kind",
                               f"capture {capture_id} holds no {name} (it holds {held})")
        arrays = store.load(capture_id, [name])
        if not arrays:
            raise _not_found(capture_id)
        tensor = arrays[name]  # (N, h, L, S)
        try:
            chosen = pick_heads(captured_heads(record.meta, tensor.shape[1]), heads)
            header, values = capture_frame(capture_id, record.run, record.meta, tensor, layer,
                                           kind, sample, chosen, max_side)
        except CaptureError as exc:
            raise _query_error(exc.field, exc.message) from None
        return Response(encode_frame(header, values), media_type="application/octet-stream",
                        headers={"Cache-Control": "no-store"})

    @router.get("/{capture_id}/heads", response_model=CaptureHeads, responses=not_found)
    def get_heads(capture_id: str, store: StoreDep,
                  sample: Annotated[int, Query(ge=0, le=65535)] = 0) -> CaptureHeads:
        """Every captured head's statistics, role scores and role on this input (as
        ``GET /api/v1/runs/{id}/heads`` for the history); needs its attention."""
        record = store.get(capture_id)
        if record is None:
            raise _not_found(capture_id)
        names = [k for k in record.tensors if k.startswith("attention.")]
        if not names:
            raise _query_error("capture", f"capture {capture_id} holds no attention")
        arrays = store.load(capture_id, names) or {}
        attention = {int(k.split(".")[1]): v for k, v in arrays.items()}
        try:
            heads = capture_heads(attention, record.meta, sample)
        except CaptureError as exc:
            raise _query_error(exc.field, exc.message) from None
        return CaptureHeads(run=record.run, capture=capture_id, step=record.meta.get("step"),
                            sample=sample, layers=len(record.meta.get("roles") or [])
                            or max(attention) + 1, roles=list(ROLES), heads=heads)

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
