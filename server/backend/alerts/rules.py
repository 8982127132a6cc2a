"""Alert rules over per-step head statistics: entropy collapse, NaN/Inf, dead and uniform heads.

An :class:`AlertTracker` takes one session's statistics rows (K, R, H) in step order
and returns the :class:`Alert` s they raise. Each rule watches each head (or layer)
for *episodes*: it fires once when its condition starts, stays quiet while it lasts,
and re-arms only when the value is back past a second threshold (hysteresis), so a
value sitting at the edge does not flood anyone. Thresholds are an
:class:`AlertRules` (``ATTNSCOPE_ALERT_*`` settings; docs/statistics.md).

>>> tracker = AlertTracker(AlertRules(warmup_steps=0, smooth_steps=1))
>>> row = lambda e: np.array([[[e]]] + [[[0.0]]] * 12, np.float32).reshape(1, 13, 1)
>>> [a.rule for a in tracker.observe(0, row(0.8))], [a.rule for a in tracker.observe(1, row(0.01))]
([], ['entropy_floor', 'entropy_drop', 'layer_entropy_floor', 'layer_entropy_drop'])
>>> tracker.observe(2, row(0.005)), [a.rule for a in tracker.observe(3, row(0.9))]
([], [])
>>> [a.rule for a in tracker.observe(4, row(0.01))]                   # re-armed at 0.9
['entropy_floor', 'entropy_drop', 'layer_entropy_floor', 'layer_entropy_drop']

Shape legend: K layers, R statistics per head (``HEAD_STATISTICS``), H heads.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from ...core.roles import RoleRule
from ...core.stats import HEAD_STATISTICS

_INDEX = {name: i for i, name in enumerate(HEAD_STATISTICS)}
# Scores whose role means "this head attends to one key by design" (attnscope.core.roles).
_ONE_KEY_ROLES = ("previous_token", "diagonal", "sink", "induction", "duplicate_token")
RULES = ("entropy_floor", "entropy_drop", "layer_entropy_floor", "layer_entropy_drop",
         "nonfinite", "dead", "uniform")
SEVERITY = {"nonfinite": "critical"}  # every other rule: "warning"


@dataclass(frozen=True)
class AlertRules:
    """Thresholds of the alert rules; every default carries its reason. Entropy is the
    normalised entropy of the history (0: each query on one key, 1: uniform)."""

    # Off: no rule is evaluated (the statistics are recorded all the same).
    enabled: bool = True
    # A head below 0.02 looks at a single key per query (the page's and the role
    # tracker's "collapsed" threshold); heads holding a one-key role (previous-token,
    # self, sink, induction, duplicate-token) are exempt: that is their job.
    entropy_floor: float = 0.02
    # Falling by half of its highest value of the last 20 steps is collapse, not
    # learning (heads specialise over hundreds of steps); only from 0.1 up, below that
    # the drop is rounding. Heads holding a one-key role are exempt here too (an
    # induction head forming is a drop).
    drop_fraction: float = 0.5
    drop_steps: int = 20
    drop_from: float = 0.1
    # Drops compare means over the last 5 rows: one sample's statistics jump from batch
    # to batch (by half, in the induction demo), a collapse lasts.
    smooth_steps: int = 5
    # A layer's mean entropy (over its heads without a one-key role) below 0.05: the
    # whole layer collapsed (Zhai et al. 2023 watch it per layer).
    layer_entropy_floor: float = 0.05
    # That mean falling by 40 % within drop_steps: the heads collapse together, as they
    # do before a loss spike under too high a learning rate.
    layer_drop_fraction: float = 0.4
    # Dead: 95 % of every query's weight on the first token (an attention sink that
    # passes nothing on). Uniform: entropy 0.99, the head averages everything. Both
    # fire on a change only (a head must first be below the threshold): every head is
    # near uniform at initialisation.
    dead_first_token: float = 0.95
    uniform_entropy: float = 0.99
    # Rules about entropy falling or heads turning dead or uniform wait 100 steps: at
    # the start of training heads leave uniform attention fast, by design. NaN / Inf
    # and the floors apply from the first step.
    warmup_steps: int = 100
    # A one-key role from the score the role tracker gives it at (0.4).
    role_score: float = RoleRule.threshold

    def validate(self) -> AlertRules:
        for name in ("entropy_floor", "drop_fraction", "drop_from", "layer_entropy_floor",
                     "layer_drop_fraction", "dead_first_token", "uniform_entropy",
                     "role_score"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not 0 <= value <= 1:
                raise ValueError(f"alert_{name} must be a number in [0, 1], got {value!r}")
        for name, low in (("drop_steps", 1), ("smooth_steps", 1), ("warmup_steps", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"alert_{name} must be an int >= {low}, got {value!r}")
        return self

    @classmethod
    def from_settings(cls, settings: Any) -> AlertRules:
        """Defaults, overridden by ``settings.alert_<field>`` where present."""
        values = {f.name: getattr(settings, f"alert_{f.name}") for f in fields(cls)
                  if hasattr(settings, f"alert_{f.name}")}
        return cls(**values).validate()


@dataclass(frozen=True)
class Alert:
    """One episode of one rule on one head (``head`` None: the whole layer)."""

    step: int
    layer: int
    head: int | None
    rule: str
    values: dict[str, float]
    text: str
    time: float = field(default_factory=time.time)

    @property
    def severity(self) -> str:
        return SEVERITY.get(self.rule, "warning")

    def to_message(self, run: str, session: str, seq: int) -> dict[str, Any]:
        """The alert as every consumer gets it (REST, websocket, webhook, log, a training
        process's ``on_alert``): a plain JSON-able dict, built here only.

        >>> Alert(7, 1, 2, "nonfinite", {"nan": 3.0}, "t", 0.0).to_message("r", "s", 4)["id"]
        's:4'
        """
        return {"type": "alert", "id": f"{session}:{seq}", "run": run, "session": session,
                "seq": seq, "step": self.step, "layer": self.layer, "head": self.head,
                "scope": "layer" if self.head is None else "head", "rule": self.rule,
                "severity": self.severity,
                "values": {k: float(v) if math.isfinite(v) else None
                           for k, v in self.values.items()},
                "text": self.text, "time": self.time}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _where(step: int, layer: int, head: int | None) -> str:
    return f"step {step}: L{layer}" + ("" if head is None else f" H{head}")


class _Episode:
    """One rule on one head or layer: armed until it fires, re-armed by ``clear``."""

    __slots__ = ("armed",)

    def __init__(self, armed: bool) -> None:
        self.armed = armed

    def update(self, firing: bool, clear: bool) -> bool:
        """Whether it fires now."""
        if self.armed and firing:
            self.armed = False
            return True
        if not self.armed and clear:
            self.armed = True
        return False


class AlertTracker:
    """The rules over one session's rows, fed in step order (not thread-safe)."""

    def __init__(self, rules: AlertRules | None = None) -> None:
        self.rules = (rules or AlertRules()).validate()
        self._episodes: dict[tuple[str, int, int | None], _Episode] = {}
        self._raw: dict[tuple[int, int | None], deque] = {}  # the last smooth_steps values
        self._recent: dict[tuple[int, int | None], deque] = {}  # (step, smoothed value)
        self._first: int | None = None

    def observe(self, step: int, stats: np.ndarray) -> list[Alert]:
        """The alerts ``stats`` (K, R, H) of ``step`` raises (R in ``HEAD_STATISTICS``
        order; rows of an older, shorter layout raise entropy and NaN alerts only)."""
        rules = self.rules
        if not rules.enabled:
            return []
        if self._first is None:
            self._first = step
        warm = step - self._first >= rules.warmup_steps
        out: list[Alert] = []
        K, R, H = stats.shape
        for layer in range(K):
            values = stats[layer]  # (R, H)
            entropy = values[_INDEX["entropy"]]
            full = len(HEAD_STATISTICS) == R  # older rows have no role scores
            one_key = self._one_key(values) if full else np.zeros(H, bool)
            for head in range(H):
                if not math.isnan(entropy[head]) or values[_INDEX["nan"], head] > 0:
                    out.extend(self._head(step, layer, head, values[:, head], bool(one_key[head]),
                                          warm))
            free = [h for h in range(H) if not one_key[h] and math.isfinite(entropy[h])]
            out.extend(self._layer(step, layer, float(entropy[free].mean()) if free else math.nan,
                                   warm))
        return out

    def _one_key(self, values: np.ndarray) -> np.ndarray:
        scores = np.stack([values[_INDEX[name]] for name in _ONE_KEY_ROLES])  # (5, H)
        return np.nan_to_num(scores, nan=0.0).max(0) >= self.rules.role_score

    def _episode(self, rule: str, layer: int, head: int | None, armed: bool = True) -> _Episode:
        key = (rule, layer, head)
        episode = self._episodes.get(key)
        if episode is None:
            episode = self._episodes[key] = _Episode(armed)
        return episode

    def _drop(self, key: tuple[int, int | None], step: int, value: float,
              fraction: float) -> tuple[bool, bool, float, float]:
        """(falling, recovered, highest, now): ``value`` averaged over the last
        ``smooth_steps`` rows (``now``) against the highest such average of the last
        ``drop_steps`` steps."""
        rules = self.rules
        raw = self._raw.setdefault(key, deque(maxlen=rules.smooth_steps))
        if math.isfinite(value):
            raw.append(value)
        if not raw:
            return False, True, math.nan, math.nan
        now = sum(raw) / len(raw)
        recent = self._recent.setdefault(key, deque())
        while recent and recent[0][0] <= step - rules.drop_steps:
            recent.popleft()
        highest = max((v for _, v in recent), default=now)
        recent.append((step, now))
        if highest < rules.drop_from:
            return False, True, highest, now
        drop = (highest - now) / highest
        return drop >= fraction, drop < fraction / 2, highest, now

    def _head(self, step: int, layer: int, head: int, v: np.ndarray, one_key: bool,
              warm: bool) -> list[Alert]:
        rules, out = self.rules, []
        where = _where(step, layer, head)
        entropy = float(v[_INDEX["entropy"]])
        nan, inf = float(v[_INDEX["nan"]]), float(v[_INDEX["inf"]])
        if self._episode("nonfinite", layer, head).update(nan > 0 or inf > 0,
                                                          nan == 0 and inf == 0):
            out.append(Alert(step, layer, head, "nonfinite", {"nan": nan, "inf": inf},
                             f"{where} has non-finite attention ({nan:g} NaN, {inf:g} Inf)"))
        if not math.isfinite(entropy):
            return out
        floor = rules.entropy_floor
        if self._episode("entropy_floor", layer, head).update(
                entropy < floor and not one_key, entropy >= 2 * floor):
            out.append(Alert(step, layer, head, "entropy_floor",
                             {"entropy": entropy, "floor": floor},
                             f"{where} entropy collapsed to {entropy:.3f} (floor {floor:g})"))
        falling, recovered, highest, now = self._drop((layer, head), step, entropy,
                                                      rules.drop_fraction)
        if self._episode("entropy_drop", layer, head).update(warm and falling and not one_key,
                                                             recovered):
            out.append(Alert(step, layer, head, "entropy_drop",
                             {"entropy": entropy, "mean": now, "from": highest,
                              "steps": rules.drop_steps},
                             f"{where} entropy fell from {highest:.3f} to {now:.3f} within "
                             f"{rules.drop_steps} steps"))
        first = float(v[_INDEX["first_token"]])
        if math.isfinite(first) and self._episode("dead", layer, head, armed=False).update(
                warm and first >= rules.dead_first_token, first < rules.dead_first_token - 0.1):
            out.append(Alert(step, layer, head, "dead", {"first_token": first},
                             f"{where} went dead: {first:.0%} of its weight on the first token"))
        if self._episode("uniform", layer, head, armed=False).update(
                warm and entropy >= rules.uniform_entropy,
                entropy < rules.uniform_entropy - 0.04):
            out.append(Alert(step, layer, head, "uniform", {"entropy": entropy},
                             f"{where} went uniform (entropy {entropy:.3f}): it averages "
                             "every key"))
        return out

    def _layer(self, step: int, layer: int, free_mean: float, warm: bool) -> list[Alert]:
        rules, out = self.rules, []
        where = _where(step, layer, None)
        floor = rules.layer_entropy_floor
        if self._episode("layer_entropy_floor", layer, None).update(
                math.isfinite(free_mean) and free_mean < floor, not free_mean < 2 * floor):
            out.append(Alert(step, layer, None, "layer_entropy_floor",
                             {"entropy": free_mean, "floor": floor},
                             f"{where} collapsed: mean head entropy {free_mean:.3f} "
                             f"(floor {floor:g})"))
        falling, recovered, highest, now = self._drop((layer, None), step, free_mean,
                                                      rules.layer_drop_fraction)
        if self._episode("layer_entropy_drop", layer, None).update(warm and falling, recovered):
            out.append(Alert(step, layer, None, "layer_entropy_drop",
                             {"entropy": free_mean, "mean": now, "from": highest,
                              "steps": rules.drop_steps},
                             f"{where} mean head entropy fell from {highest:.3f} to {now:.3f} "
                             f"within {rules.drop_steps} steps"))
        return out
