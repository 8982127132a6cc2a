"""Head roles over a recorded run: which head holds which role since when, and the events.

The history writer feeds a :class:`RoleBook` every stats row it stores (head
statistics and pattern scores (K, R, H) per step) and the induction-probe scores
of every snapshot; the book keeps one :class:`RoleTracker` per session. A past
session's tracker is rebuilt by replaying its stored rows (deterministic).

Shape legend: K layers, R statistics per head (``HEAD_STATISTICS``), H heads,
P probe samples, L queries, S keys.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ...core.roles import REPEAT_NAMES, ROLES, RoleRule, assign_roles, repeat_scores
from ...core.stats import HEAD_STATISTICS
from .store import HistoryStore

_INDEX = {name: i for i, name in enumerate(HEAD_STATISTICS)}
ROLE_TEXT = {
    "previous_token": "a previous-token head", "sink": "a first-token (sink) head",
    "diagonal": "a self (diagonal) head", "local": "a local head", "uniform": "a uniform head",
    "induction": "an induction head", "duplicate_token": "a duplicate-token head",
}
MAX_EVENTS = 5000  # older events are dropped (a run whose heads flicker for ever)
# Roles are assigned from role scores averaged over rows (an exponential moving average
# weighing the newest row 0.3, ~5 rows' memory): one batch's noise moves them little, a
# clean change of pattern still crosses the thresholds within a row or two.
SCORE_SMOOTHING = 0.3
# A head changes role only after the new role held this many rows in a row (the same
# idea as the budget's, which restores only after several quiet windows): scores that
# hover at a threshold do not flip a role back and forth.
SETTLE_ROWS = 3


@dataclass(frozen=True)
class RoleEvent:
    """A head changed: ``kind`` is ``gained`` (``role`` set), ``lost`` (``role`` is the
    one lost), ``collapsed`` (entropy near 0 with no role) or ``nonfinite`` (NaN/Inf)."""

    step: int
    layer: int
    head: int
    kind: str
    role: str | None
    text: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _describe(step: int, layer: int, head: int, kind: str, role: str | None,
              was: str | None) -> str:
    where = f"step {step}: L{layer} H{head}"
    if kind == "gained":
        tail = f" (was {ROLE_TEXT[was]})" if was else ""
        return f"{where} became {ROLE_TEXT[role]}{tail}"
    if kind == "lost":
        return f"{where} is no longer {ROLE_TEXT[role]}"
    if kind == "collapsed":
        return f"{where} collapsed (entropy near 0 with no role)"
    return f"{where} has NaN/Inf attention"


def probe_half(tensors: dict[str, np.ndarray]) -> int | None:
    """The repeat length L // 2 of a snapshot's induction probe ``repeat.<layer>`` (P, H, L, S)."""
    for name, array in tensors.items():
        if name.startswith("repeat."):
            return array.shape[-2] // 2
    return None


def snapshot_repeat_scores(tensors: dict[str, np.ndarray], layers: int) -> np.ndarray | None:
    """Induction and duplicate-token scores (K, 2, H) of a snapshot's induction probe,
    averaged over its P probe samples: from ``repeat_scores.<layer>`` (P, 2, H), or, in
    snapshots written before those, from ``repeat.<layer>`` matrices (P, H, L, S); None
    without either."""
    half = probe_half(tensors)
    per_layer: dict[int, np.ndarray] = {}
    for name, array in tensors.items():
        kind, _, layer = name.partition(".")
        if kind == "repeat_scores":
            per_layer[int(layer)] = np.asarray(array, np.float32).mean(0)  # (2, H)
        elif kind == "repeat" and half is not None and half >= 2:
            P, H = array.shape[:2]
            flat = torch.from_numpy(np.ascontiguousarray(array, np.float32))
            flat = flat.flatten(0, 1)  # (P*H, L, S)
            per_layer[int(layer)] = repeat_scores(flat, half).view(2, P, H).mean(1).numpy()
    if not per_layer:
        return None
    width = max(a.shape[1] for a in per_layer.values())
    out = np.full((layers, len(REPEAT_NAMES), width), np.nan, np.float32)
    for layer, scores in per_layer.items():
        if layer < layers:
            out[layer, :, : scores.shape[1]] = scores
    return out


class RoleTracker:
    """Roles of every head of one session, fed its stats rows in step order."""

    def __init__(self, rule: RoleRule | None = None) -> None:
        self.rule = rule or RoleRule()
        self.roles: list[list[str | None]] = []  # (K, H)
        self.since: list[list[int | None]] = []  # (K, H): step the role was taken
        self.flags: list[list[str | None]] = []  # (K, H): "collapsed" / "nonfinite" / None
        self.events: list[RoleEvent] = []
        self.initial: list[list[str | None]] = []  # (K, H): roles at the first row
        self.first_step: int | None = None
        self.step: int | None = None  # of the last row observed
        self.stats: np.ndarray | None = None  # (K, R, H) of the last row
        self.repeat: np.ndarray | None = None  # (K, 2, H): the latest induction probe's scores
        self.repeat_step: int | None = None
        self.smoothed: np.ndarray | None = None  # (K, len(ROLES), H): scores roles come from
        self.pending: list[list[tuple[str | None, int]]] = []  # (K, H): (role, rows held)
        self.lock = threading.Lock()

    def set_repeat(self, step: int, scores: np.ndarray) -> None:
        """The induction probe of snapshot ``step`` scored (K, 2, H): used from the next row."""
        with self.lock:
            self.repeat, self.repeat_step = scores, step

    def fill(self, stats: np.ndarray) -> np.ndarray:
        """``stats`` (K, R, H) with its induction rows set from the latest probe (if unset)."""
        if self.repeat is None or stats.shape[1] != len(HEAD_STATISTICS):
            return stats
        out = stats.copy()
        K, H = min(out.shape[0], self.repeat.shape[0]), min(out.shape[2], self.repeat.shape[2])
        for r, name in enumerate(REPEAT_NAMES):
            i = _INDEX[name]
            block = out[:K, i, :H]
            missing = np.isnan(block)
            block[missing] = self.repeat[:K, r, :H][missing]
        return out

    def observe(self, step: int, stats: np.ndarray) -> list[RoleEvent]:
        """Take the row of ``step`` (stats (K, R, H) in ``HEAD_STATISTICS`` order)."""
        if stats.shape[1] != len(HEAD_STATISTICS):
            return []  # a row of an older layout: statistics only
        with self.lock:
            K, _, H = stats.shape
            self._grow(K, H)
            new: list[RoleEvent] = []
            first = self.step is None  # the roles heads start with are not events
            smoothed = self._smooth(stats)  # (K, len(ROLES), H)
            for layer in range(K):
                scores = {name: torch.from_numpy(smoothed[layer, r].copy())
                          for r, name in enumerate(ROLES)}
                roles = assign_roles(scores, self.roles[layer][:H], self.rule)
                if not first:
                    roles = [self._settled(layer, head, role) for head, role in enumerate(roles)]
                for head, role in enumerate(roles):
                    events = self._update(step, layer, head, role, stats[layer, :, head])
                    new.extend(e for e in events if not (first and e.kind == "gained"))
            if first:
                self.initial = [list(row) for row in self.roles]
                self.first_step = step
            self.step, self.stats = step, stats
            self.events.extend(new)
            if len(self.events) > MAX_EVENTS:
                del self.events[: len(self.events) - MAX_EVENTS]
            return new

    def _smooth(self, stats: np.ndarray) -> np.ndarray:
        """The role scores of ``stats`` (K, R, H) averaged with the earlier rows' (EMA);
        a score unknown now (NaN) is unknown, a score new now starts from its value."""
        raw = stats[:, [_INDEX[name] for name in ROLES], :].astype(np.float32)  # (K, roles, H)
        old = self.smoothed
        if old is None or old.shape != raw.shape:
            self.smoothed = raw
            return raw
        out = np.where(np.isnan(old), raw, old + SCORE_SMOOTHING * (raw - old))
        self.smoothed = out
        return out

    def _settled(self, layer: int, head: int, role: str | None) -> str | None:
        """``role`` once it held :data:`SETTLE_ROWS` rows in a row, else the head's role."""
        current = self.roles[layer][head]
        if role == current:
            self.pending[layer][head] = (current, 0)
            return current
        waiting, rows = self.pending[layer][head]
        rows = rows + 1 if waiting == role else 1
        self.pending[layer][head] = (role, rows)
        return role if rows >= SETTLE_ROWS else current

    def _grow(self, K: int, H: int) -> None:
        for table in (self.roles, self.since, self.flags):
            while len(table) < K:
                table.append([])
            for row in table:
                row.extend([None] * (H - len(row)))
        while len(self.pending) < K:
            self.pending.append([])
        for row in self.pending:
            row.extend([(None, 0)] * (H - len(row)))

    def _update(self, step: int, layer: int, head: int, role: str | None,
                values: np.ndarray) -> list[RoleEvent]:
        events = []
        was = self.roles[layer][head]
        if role != was:
            if role is not None:
                events.append(self._event(step, layer, head, "gained", role, was))
            else:
                events.append(self._event(step, layer, head, "lost", was, None))
            self.roles[layer][head] = role
            self.since[layer][head] = step if role is not None else None
        entropy = float(values[_INDEX["entropy"]])
        bad = values[_INDEX["nan"]] > 0 or values[_INDEX["inf"]] > 0
        flag = "nonfinite" if bad else "collapsed" if role is None and math.isfinite(entropy) \
            and entropy < self.rule.collapsed_entropy else None
        if flag is not None and flag != self.flags[layer][head]:
            events.append(self._event(step, layer, head, flag, None, None))
        self.flags[layer][head] = flag
        return events

    @staticmethod
    def _event(step: int, layer: int, head: int, kind: str, role: str | None,
               was: str | None) -> RoleEvent:
        text = _describe(step, layer, head, kind, role, was)
        return RoleEvent(step, layer, head, kind, role, text)

    def roles_at(self, step: int) -> tuple[list[list[str | None]], list[list[int | None]]]:
        """Roles and since-steps (K, H) as they were at ``step`` (replaying the events
        from the roles of the first row)."""
        with self.lock:
            roles = [list(row) for row in self.initial]
            since: list[list[int | None]] = [[None if r is None else self.first_step
                                              for r in row] for row in self.initial]
            for e in self.events:
                if e.step > step:
                    break
                if e.kind == "gained":
                    roles[e.layer][e.head], since[e.layer][e.head] = e.role, e.step
                elif e.kind == "lost":
                    roles[e.layer][e.head], since[e.layer][e.head] = None, None
            return roles, since


class RoleBook:
    """One :class:`RoleTracker` per session: live ones fed by the writer, past ones replayed."""

    def __init__(self, store: HistoryStore, rule: RoleRule | None = None,
                 max_replayed: int = 8) -> None:
        self.store = store
        self.rule = rule or RoleRule()
        self.max_replayed = max_replayed
        self._live: dict[str, RoleTracker] = {}
        self._replayed: OrderedDict[str, tuple[int | None, RoleTracker]] = OrderedDict()
        self._lock = threading.Lock()
        store.deleted.append(self.forget)  # a deleted session's tracker goes with it

    def tracker(self, session: str) -> RoleTracker:
        """The live tracker of ``session`` (created on first use)."""
        with self._lock:
            tracker = self._live.get(session)
            if tracker is None:
                tracker = self._live[session] = RoleTracker(self.rule)
            return tracker

    def rows(self, session: str, rows: list[Any]) -> list[Any]:
        """Fill rows' induction scores from the latest probe, observe them; the filled rows."""
        tracker = self.tracker(session)
        out = []
        for row in rows:
            if row.heads is not None:
                row = type(row)(row.step, row.time, row.scalars, tracker.fill(row.heads))
                tracker.observe(row.step, row.heads)
            out.append(row)
        return out

    def snapshot(self, session: str, step: int, tensors: dict[str, np.ndarray]) -> None:
        """Score a snapshot's induction probe (``repeat.<layer>`` arrays), if it has one."""
        layers = sum(1 for name in tensors if name.startswith("attention."))
        scores = snapshot_repeat_scores(tensors, max(layers, 1))
        if scores is not None:
            self.tracker(session).set_repeat(step, scores)

    def forget(self, session: str) -> None:
        with self._lock:
            self._live.pop(session, None)
            self._replayed.pop(session, None)

    def get(self, session: str) -> RoleTracker:
        """The live tracker of ``session``, else one rebuilt from its stored rows (cached
        until the session gets newer rows)."""
        with self._lock:
            live = self._live.get(session)
            if live is not None:
                return live
            cached = self._replayed.get(session)
        last = self.store.stat_at(session, None)
        last_step = None if last is None else last.step
        if cached is not None and cached[0] == last_step:
            return cached[1]
        tracker = RoleTracker(self.rule)
        for row in self.store.stats(session):
            if row.heads is not None:
                tracker.observe(row.step, row.heads)
        with self._lock:
            self._replayed[session] = (last_step, tracker)
            self._replayed.move_to_end(session)
            while len(self._replayed) > self.max_replayed:
                self._replayed.popitem(last=False)
        return tracker
