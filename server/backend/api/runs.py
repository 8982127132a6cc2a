"""``/api/v1/runs``: list runs, read one, pause / resume / restart it."""

from __future__ import annotations

from enum import StrEnum

from fastapi import APIRouter, HTTPException

from ...core.run_base import RunStateError
from ..history.browse import delete_run_data
from .deps import CaptureStoreDep, HistoryDep, RegistryDep, RunDep
from .models import RunPublic, ScalarsPublic

router = APIRouter(prefix="/runs", tags=["runs"])


class RunAction(StrEnum):
    pause = "pause"
    resume = "resume"
    restart = "restart"


@router.get("")
def list_runs(registry: RegistryDep) -> list[RunPublic]:
    return [RunPublic.model_validate(run.summary()) for run in registry.list()]


@router.get("/{run_id:path}/scalars", responses={404: {"description": "no run has this id"}})
def get_scalars(run: RunDep) -> ScalarsPublic:
    """Every step's scalars since the run started (thinned to at most 2048 points)."""
    return ScalarsPublic(run=run.id, **run.history.to_dict())


# Run ids may contain "/" (``alice/lr3e-4``, ``run/rank-1``): the ``path`` converter
# takes them whole. Routes with a suffix come first so this one cannot swallow them.
@router.get("/{run_id:path}", responses={404: {"description": "no run has this id"}})
def get_run(run: RunDep) -> RunPublic:
    return RunPublic.model_validate(run.summary())


@router.delete("/{run_id:path}", status_code=204,
               responses={404: {"description": "no run has this id"},
                          409: {"description": "the run is still live or paused"}})
def delete_run(run: RunDep, registry: RegistryDep, history: HistoryDep,
               captures: CaptureStoreDep) -> None:
    """Delete a run that has ended (or whose publisher went idle) with all its data: its
    recorded history (every session of the id) and its stored captures."""
    if run.status not in ("ended", "idle"):
        raise HTTPException(409, detail=f"run {run.id!r} is {run.status}; only ended or "
                                        "idle runs can be deleted")
    registry.remove(run.id)
    delete_run_data(history, captures, run.id)


@router.post(
    "/{run_id:path}/{action}",
    responses={404: {"description": "no run has this id"},
               409: {"description": "the run does not support this action now"}},
)
def control_run(run: RunDep, action: RunAction) -> RunPublic:
    """Pause, resume or restart a run; 409 with the reason if it cannot."""
    try:
        getattr(run, action.value)()
    except RunStateError as exc:
        raise HTTPException(409, detail=str(exc)) from None
    return RunPublic.model_validate(run.summary())
