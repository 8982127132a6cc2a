"""The pinned-inputs REST resource: ``/api/v1/pins`` (:mod:`.pinned` does the work).

Needs ``app.state.pins`` (a :class:`~.pinned.PinnedCaptures`, None when the server has no
capture store: 503; ``attnscope.backend.api.deps.get_pins``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response

from ..api.deps import PinsDep
from .models import Message, PinCreate, PinList, PinnedCapturePublic, PinPublic, PinUpdate
from .pinned import Pin, PinError, PinnedCaptures
from .requests import CaptureRejected

router = APIRouter(prefix="/api/v1/pins", tags=["captures"])


not_found = {404: {"model": Message, "description": "no such pin"}}


def to_public(pins: PinnedCaptures, pin: Pin) -> PinPublic:
    """The API view of a pin, with its state now."""
    state, next_step, not_before, message = pins.state(pin)
    return PinPublic(
        id=pin.id, run=pin.run, name=pin.name, text=pin.text, tokens=pin.tokens,
        every=pin.every, created=datetime.fromisoformat(pin.created), taken=pin.taken,
        captures=[PinnedCapturePublic(id=c.id, step=c.step,
                                      created=datetime.fromisoformat(c.created))
                  for c in pin.captures],
        state=state, next_step=next_step,
        not_before=None if not_before is None else datetime.fromtimestamp(not_before, UTC),
        message=message, error=pin.error, error_status=pin.error_status,
        min_interval_s=pins.min_interval_s)


def _http(exc: PinError | CaptureRejected) -> HTTPException:
    return HTTPException(exc.status, detail=exc.detail)


@router.post("", status_code=201, response_model=PinPublic,
             responses={409: {"model": Message, "description": "the run has its most pins, or "
                                                              "cannot capture"}})
def pin_input(body: PinCreate, pins: PinsDep, response: Response) -> PinPublic:
    """Pin an input: it is captured at the run's next step boundary, then every ``every``
    steps (at least ``pinned_min_interval_s`` apart, within the cost budget)."""
    try:
        pin = pins.add(body.run, text=body.text, tokens=body.tokens, every=body.every,
                       name=body.name)
    except (PinError, CaptureRejected) as exc:
        raise _http(exc) from None
    response.headers["Location"] = f"{router.prefix}/{pin.id}"
    return to_public(pins, pin)


@router.get("", response_model=PinList)
def list_pins(pins: PinsDep, run: Annotated[str | None, Query(max_length=200)] = None,
              ) -> PinList:
    """Pinned inputs (of one run), oldest first, with their captures."""
    return PinList(items=[to_public(pins, p) for p in pins.list(run)])


@router.get("/{pin_id}", response_model=PinPublic, responses=not_found)
def get_pin(pin_id: str, pins: PinsDep) -> PinPublic:
    try:
        return to_public(pins, pins.get(pin_id))
    except PinError as exc:
        raise _http(exc) from None


@router.patch("/{pin_id}", response_model=PinPublic, responses=not_found)
def update_pin(pin_id: str, body: PinUpdate, pins: PinsDep) -> PinPublic:
    """Capture every ``every`` steps from now on."""
    try:
        return to_public(pins, pins.update(pin_id, body.every))
    except PinError as exc:
        raise _http(exc) from None


@router.delete("/{pin_id}", status_code=204, response_class=Response, responses=not_found)
def unpin(pin_id: str, pins: PinsDep) -> Response:
    """Unpin: no more captures; its captures are deleted."""
    try:
        pins.remove(pin_id)
    except PinError as exc:
        raise _http(exc) from None
    return Response(status_code=204)
