"""Runs that outlive their process: every run recorded in the data dir, listed and opened
like a live one (``attnscope serve --data-dir DIR``, TensorBoard's habit).

At start the server adds a :class:`RecordedRun` to its registry for each run id whose
newest history session no live run holds: status ``ended``, its last recorded step,
its layers and heads from the session. The page opens it on its history (snapshots,
statistics, roles); a publisher that comes back under the same id takes it over as it
would an ended remote run. :func:`delete_run_data` is what deleting a run removes.
"""

from __future__ import annotations

import logging
import shlex
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ...core.run_base import RunRegistry, RunStateError, ScalarHistory
from ...settings import default_data_dir
from ..remote.run import RemoteRun
from .writer import HistoryWriter

logger = logging.getLogger(__name__)


class RecordedRun(RemoteRun):
    """A run known only from its recorded history (its process has ended).

    It is a :class:`RemoteRun` without a publisher: it has no frames and cannot capture,
    and a publisher announcing its id takes it over (the endpoint reuses ended remote
    runs). Its scalars are read from the store the first time they are asked for.
    """

    def __init__(self, session: dict[str, Any], service: HistoryWriter) -> None:
        meta = session["meta"]
        layers = int(meta.get("layers") or 0)
        heads = meta.get("layer_heads") or [meta.get("heads")] * layers
        roles = meta.get("roles") or ["self"] * layers
        details = [{"index": i, "name": f"layer {i}", "heads": heads[i] if i < len(heads) else None,
                    "role": roles[i] if i < len(roles) else "self"} for i in range(layers)]
        shape = meta.get("probe_shape")
        super().__init__(session["run"], session["name"] or session["run"],
                         {"layer_details": details,
                          "seq_len": shape[2] if isinstance(shape, list) and len(shape) == 4
                          else None},
                         meta.get("host"))
        self.session = session["session"]
        self.started = _parse_time(session["started"]) or self.started
        # Its last step: as said when it ended, else the last recorded one.
        last = service.store.stat_at(self.session, None)
        steps = [s for s in (meta.get("ended_at_step"), session["last_step"],
                             None if last is None else last.step)
                 if isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**62]
        self.step_index = max(steps, default=None)
        self._service = service
        self._scalars: ScalarHistory | None = None

    @property
    def history(self) -> ScalarHistory:  # type: ignore[override]
        """Every recorded step's scalars, read from the store on first use."""
        if self._scalars is None:
            scalars = ScalarHistory()
            for row in self._service.store.stats(self.session):
                if row.scalars:
                    scalars.append(row.step, row.time, row.scalars)
            self._scalars = scalars
        return self._scalars

    @history.setter
    def history(self, value: ScalarHistory) -> None:
        self._scalars = value

    def attach(self, link: Any, history: dict[str, Any] | None) -> None:
        """A publisher took the id over: from now on it is a remote run like any other."""
        self._scalars, self.session = ScalarHistory(), None
        super().attach(link, history)

    def summary(self) -> dict[str, Any]:
        # ``session``: the recorded session the page opens (older ones: the compare panel).
        return {**super().summary(), "session": self.session}

    def capture_layout(self) -> Any:
        if self.link is None:
            raise RunStateError(f"run {self.id!r} has ended (it is only recorded in the data "
                                "dir): captures need its model in a live process")
        return super().capture_layout()


def _parse_time(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)
    except (TypeError, ValueError):
        return None


def restore_recorded_runs(registry: RunRegistry, service: HistoryWriter) -> int:
    """Add a :class:`RecordedRun` for every recorded run id no run of ``registry`` holds
    (its newest session; older sessions of an id stay in ``GET /api/v1/history``).
    Returns how many were added. Newest first, after the runs already there."""
    added = 0
    taken = set(registry.ids())
    for session in service.store.sessions():  # newest first
        if session["run"] in taken or not session["meta"].get("layers"):
            continue
        taken.add(session["run"])
        try:
            registry.add(RecordedRun(session, service))
        except (ValueError, TypeError, KeyError) as exc:  # an unreadable session: skip it
            logger.warning("history: recorded run %r not listed: %s", session["run"], exc)
            continue
        added += 1
    return added


def browse_command(data_dir: Path) -> str:
    """The command that browses the runs recorded in ``data_dir``.

    >>> browse_command(default_data_dir()), browse_command(Path("/tmp/x"))
    ('attnscope serve', 'attnscope serve --data-dir /tmp/x')
    """
    if Path(data_dir).resolve() == default_data_dir().resolve():
        return "attnscope serve"
    return f"attnscope serve --data-dir {shlex.quote(str(data_dir))}"


def recorded_message(app: Any, run_id: str) -> str | None:
    """What to tell the user when a ``Dashboard.start`` run closes: where its recorded
    history stays browsable, or None when nothing of it was recorded."""
    service = app.state.history
    if service is None or service.session_of(run_id) is None:
        return None
    return (f"attnscope: run {run_id!r} is recorded; browse it after this process ends with "
            f"`{browse_command(service.store.root.parent)}`")


def delete_run_data(service: HistoryWriter | None, captures: Any, run_id: str) -> None:
    """Delete what the data dir holds of run ``run_id``: every history session of the id
    and its stored captures."""
    if service is not None:
        for session in service.store.sessions():
            if session["run"] == run_id:
                service.roles.forget(session["session"])
                service.store.delete_session(session["session"])
    while captures is not None:
        records, _ = captures.list(run=run_id, limit=500)
        if not records:
            break
        for record in records:
            captures.delete(record.id)
