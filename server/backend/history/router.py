"""The history REST resource: ``/api/v1/history`` and ``/api/v1/runs/{id}/history``.

Needs ``app.state.history`` (a :class:`HistoryWriter`). A run id that is not
live any more (a past run, or the server restarted) is served from its newest
stored session; ``session=`` picks another one (``GET /api/v1/history`` lists them).

Shape legend: T snapshots, h selected heads, L queries, S keys.
"""

from __future__ import annotations

import io
import math
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response

from ...contract.protocol import encode_frame
from ...core.jsonsafe import json_safe
from ...core.limits import Int64, LimitError, check_size, parse_index_list
from ...core.reduce import pool_labels
from ...core.stats import HEAD_STATISTICS
from ..frames import pool_factor
from .models import HistoryIndex, SessionPublic, StatsPublic
from .store import Session
from .writer import HistoryWriter

router = APIRouter(prefix="/api/v1", tags=["history"])
MAX_JSON_VALUES = 4_000_000  # json data over this many numbers: use npz


def get_service(request: Request) -> HistoryWriter:
    service = getattr(request.app.state, "history", None)
    if service is None:
        raise HTTPException(503, detail="history is not available: the server records none "
                                        "(ATTNSCOPE_HISTORY_ENABLED=false?)")
    return service


ServiceDep = Annotated[HistoryWriter, Depends(get_service)]


def _error(field: str, msg: str, status: int = 422) -> HTTPException:
    return HTTPException(status, detail=[{"loc": ["query", field], "msg": msg,
                                          "type": "value_error"}])


def _session(service: HistoryWriter, run_id: str, session_id: str | None) -> Session:
    sid = session_id or service.session_of(run_id)
    session = None if sid is None else service.store.session(sid)
    if session is None or session.run != run_id:
        if session_id is not None:
            raise _error("session", f"run {run_id!r} has no history session {session_id!r}", 404)
        raise HTTPException(404, detail=f"no history recorded for run {run_id!r}")
    return session


def _layer(session: Session, layer: int) -> int:
    layers = int(session.meta.get("layers", 0))
    if not 0 <= layer < layers:
        raise _error("layer", f"layer {layer} out of range: run {session.run!r} has "
                              f"{layers} layers (0-{layers - 1})")
    return layer


def _heads(session: Session, layer: int, heads: str | None) -> list[int]:
    per_layer = session.meta.get("layer_heads") or []
    n = per_layer[layer] if layer < len(per_layer) and per_layer[layer] else \
        int(session.meta.get("heads") or 0)
    if heads is None or heads.strip() == "":
        return list(range(n))
    try:
        return list(parse_index_list("heads", heads, n, where=f"layer {layer}"))
    except LimitError as exc:
        raise _error("heads", exc.message) from None


# Integers are held to int64 (limits.Int64): SQLite cannot compare anything larger.
Layer = Annotated[Int64, Query(ge=0, description="layer index, 0-based")]
Heads = Annotated[str | None, Query(max_length=65536,
                                    description="comma-separated head indices (default all)")]
From = Annotated[Int64 | None, Query(alias="from", description="first step (inclusive)")]
To = Annotated[Int64 | None, Query(alias="to", description="last step (inclusive)")]
Step = Annotated[Int64, Query(description="a training step")]
Sample = Annotated[Int64, Query(ge=0, description="probe sample, 0-based")]
SessionQ = Annotated[str | None, Query(description="a session id (default: the newest)")]


@router.get("/history")
def list_sessions(service: ServiceDep) -> list[SessionPublic]:
    """Every recorded session (one per run start), newest first."""
    live = service.live_sessions()
    return [SessionPublic(**s, live=s["session"] in live) for s in service.store.sessions()]


@router.get("/runs/{run_id:path}/history", responses={404: {"description": "no history"}})
def history_index(run_id: str, service: ServiceDep, layer: Layer = 0, heads: Heads = None,
                  start: From = None, end: To = None, session: SessionQ = None,
                  stats: Annotated[bool, Query(description="include per-step statistics")] = True,
                  ) -> HistoryIndex:
    """The snapshots kept (steps) and every recorded step's head statistics and scalars.

    A run being recorded that has not finished a step yet has an empty index
    (``session`` null), so a page can poll it from the start."""
    if session is None and service.is_recording(run_id) and service.session_of(run_id) is None:
        return _empty_index(run_id)
    s = _session(service, run_id, session)
    layer = _layer(s, layer)
    chosen = _heads(s, layer, heads)
    snaps = service.store.snapshots(s.id, start, end)
    rows = service.store.stats(s.id, start, end) if stats else []
    values: dict[str, list[list[float | None]]] = {name: [] for name in HEAD_STATISTICS}
    for row in rows:
        for i, name in enumerate(HEAD_STATISTICS):
            if row.heads is None or layer >= row.heads.shape[0] or i >= row.heads.shape[1]:
                values[name].append([None] * len(chosen))
            else:
                values[name].append(json_safe(row.heads[layer, i, chosen].tolist()))
    names = sorted({k for row in rows for k in row.scalars})
    base = f"/api/v1/runs/{run_id}/history"
    return HistoryIndex(
        run=s.run, session=s.id, name=s.name, started=s.started, layer=layer, heads=chosen,
        layers=int(s.meta.get("layers", 0)), every=int(s.meta.get("every", 0)),
        probe={"samples": s.meta.get("probe_samples"), "shape": s.meta.get("probe_shape"),
               "labels": s.meta.get("probe_labels")},
        snapshots=[{"step": step, "time": t} for step, t in snaps],
        stats=StatsPublic(steps=[r.step for r in rows], time=[r.time for r in rows],
                          scalars={n: [r.scalars.get(n) for r in rows] for n in names}, **values),
        urls={"data": f"{base}/data?session={s.id}&layer={layer}",
              "frame": f"{base}/frame?session={s.id}&layer={layer}&step="},
    )


def _empty_index(run_id: str) -> HistoryIndex:
    empty = StatsPublic(steps=[], time=[], entropy=[], max_weight=[], first_token=[], nan=[],
                        inf=[], scalars={})
    return HistoryIndex(run=run_id, session=None, name=None, started=None, layer=0, heads=[],
                        layers=0, every=0, probe={}, snapshots=[], stats=empty, urls={})


def _evolution(service: HistoryWriter, s: Session, layer: int, chosen: list[int],
               start: int | None, end: int | None, sample: int,
               limit: int) -> tuple[np.ndarray, np.ndarray]:
    """(steps (T,), attention (T, h, L, S) float32); 422 before building past ``limit`` bytes."""
    steps, arrays = [], []
    snapshots = service.store.snapshots(s.id, start, end)
    for step, _ in snapshots:
        data = service.store.load_snapshot(s.id, step, [f"attention.{layer}"])
        if not data:
            continue
        a = data[f"attention.{layer}"]  # (P, H, L, S)
        if sample >= a.shape[0]:
            raise _error("sample", f"sample {sample} out of range: the probe has "
                                   f"{a.shape[0]} samples")
        if not arrays:  # the first snapshot tells the size of all: check before the rest
            try:
                check_size("heads", len(snapshots), len(chosen), a.shape[2], a.shape[3],
                           limit=limit)
            except LimitError as exc:
                raise _error(exc.field, exc.message + " (or use from/to)") from None
        steps.append(step)
        arrays.append(a[sample, chosen].astype(np.float32))  # (h, L, S)
    if not arrays:
        return np.zeros(0, np.int64), np.zeros((0, len(chosen), 0, 0), np.float32)
    return np.asarray(steps, np.int64), np.stack(arrays)  # (T,), (T, h, L, S)


@router.get("/runs/{run_id:path}/history/data", responses={404: {"description": "no history"}})
def history_data(run_id: str, service: ServiceDep, request: Request, layer: Layer = 0,
                 heads: Heads = None, start: From = None, end: To = None, session: SessionQ = None,
                 sample: Sample = 0,
                 format: Literal["npz", "json"] = "npz") -> Response:
    """The heads' evolution on the probe: ``steps`` (T,) and ``attention`` (T, h, L, S)."""
    s = _session(service, run_id, session)
    layer = _layer(s, layer)
    chosen = _heads(s, layer, heads)
    limit = request.app.state.settings.max_response_bytes
    if format == "json":  # ~10 bytes of text per number, and a python float (24 B) each
        limit = min(limit, 4 * MAX_JSON_VALUES)
    steps, attention = _evolution(service, s, layer, chosen, start, end, sample, limit)
    if format == "json":
        return Response(
            content=_json({"run": s.run, "session": s.id, "layer": layer, "heads": chosen,
                           "steps": steps.tolist(), "shape": list(attention.shape),
                           "attention": np.where(np.isfinite(attention), attention,
                                                 np.nan).tolist()}),
            media_type="application/json")
    buf = io.BytesIO()
    np.savez(buf, steps=steps, attention=attention, heads=np.asarray(chosen, np.int64))
    name = f"{run_id.replace('/', '_')}-L{layer}-history.npz"
    return Response(buf.getvalue(), media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})


def _json(obj: Any) -> bytes:
    import json

    return json.dumps(json_safe(obj), separators=(",", ":")).encode()


@router.get("/runs/{run_id:path}/history/frame", responses={404: {"description": "no snapshot"}},
            response_class=Response)
def history_frame(run_id: str, service: ServiceDep, step: Step, layer: Layer = 0,
                  heads: Heads = None, session: SessionQ = None,
                  sample: Sample = 0,
                  max_side: Annotated[int, Query(ge=4, le=1024)] = 128) -> Response:
    """The snapshot at or before ``step`` as one binary frame of docs/protocol.md
    (kind ``attention``, float16, pooled to ``max_side``)."""
    import torch

    from ..frames import pool_matrix

    s = _session(service, run_id, session)
    layer = _layer(s, layer)
    chosen = _heads(s, layer, heads)
    at = service.store.snapshot_at(s.id, step)
    data = None if at is None else service.store.load_snapshot(s.id, at, [f"attention.{layer}"])
    if not data:
        raise _error("step", f"run {run_id!r} has no snapshot at or before step {step}", 404)
    a = data[f"attention.{layer}"]  # (P, H, L, S)
    if sample >= a.shape[0]:
        raise _error("sample", f"sample {sample} out of range: the probe has {a.shape[0]} samples")
    values = torch.from_numpy(np.ascontiguousarray(a[sample, chosen]))  # (h, L, S)
    pool = pool_factor(values.shape[1], values.shape[2], max_side)
    values = pool_matrix(values, pool).to(torch.float16)
    labels = s.meta.get("probe_labels") if sample == 0 else None
    stored = 1  # the pooling the snapshot was stored with (history_snapshot_max_side)
    if labels and len(labels) > a.shape[2]:
        stored = math.ceil(len(labels) / a.shape[2])
        labels = pool_labels(labels, stored)
    roles = s.meta.get("roles") or []
    role = roles[layer] if layer < len(roles) else "self"
    q = pool_labels(labels, pool) if labels and len(labels) == a.shape[2] else None
    k = pool_labels(labels, pool) if labels and role == "self" and len(labels) == a.shape[3] \
        else None
    header = {"type": "frame", "run": s.run, "step": at, "kind": "attention", "layer": layer,
              "heads": chosen, "sample": sample, "shape": list(values.shape),
              "dtype": "float16", "scale": None, "offset": None, "pool": pool * stored,
              "role": role,
              "labels": None if q is None and k is None else {"queries": q, "keys": k},
              "session": s.id, "history": True}
    body = encode_frame(header, values.numpy().astype("<f2", copy=False))
    return Response(body, media_type="application/octet-stream",
                    headers={"Cache-Control": "no-store"})
