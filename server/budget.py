"""The dashboard's cost budget: what watching costs the training loop, and what it thins.

One :class:`Budget` per run. The dashboard's code in the training thread (the history
recorder's and the stream publisher's event handlers and step hooks) adds the CPU time
it used (``time.thread_time()``: on a busy machine, being preempted is not the
dashboard's cost) with :meth:`Budget.spend`; its helper threads (the history writer,
the event loop's encoding) add theirs with :meth:`Budget.spend_helper`. Training time
is measured by ``Run.step`` (:meth:`Budget.step_begin`, :meth:`Budget.step_end`): from
the end of one ``step()`` to the start of the next, less the dashboard's time in
between. Per window (``window_s`` seconds, ``min_steps`` steps) the overhead is
dashboard time / training time. docs/budget.md tells the whole story.

Over 80 % of ``max_overhead`` (``AIM``: room for what it cannot measure) the budget
thins, in this order of preference (what a viewer misses least first): head
statistics in the history every 2, 4 ... 64 steps; snapshots 2x ... 32x further
apart; stream frames at 1/2 ... 1/32 of the rate asked for; pooled views at 1/2 ...
1/8 of the side asked for. Well under budget it restores one level per window, what a
viewer misses most first, if that still fits.

>>> clock = FakeClock()
>>> b = Budget(0.03, clock=clock, window_s=1.0)
>>> for _ in range(12):  # steps of 100 ms, the stream costing 10 ms each
...     b.step_begin(); b.spend("stream", 0.010); clock.advance(0.010); b.step_end()
...     clock.advance(0.100)
>>> b.levels["stream"], b.stream_factor  # thinned to 1.25 %, under 80 % of the budget
(3, 8)
>>> b.text()
'stream frames at 1/8 rate to stay under 3 % (now 10 %)'
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

COMPONENTS = ("stats", "snapshots", "stream")


@dataclass(frozen=True)
class Knob:
    """One kind of thinning: level ``n`` divides ``component``'s work by about 2**n."""

    name: str
    component: str
    limit: int  # the highest level


# In order of preference: what a viewer misses least is thinned first.
KNOBS = (
    Knob("stats", "stats", 6),  # history statistics every 2 ... 64 steps
    Knob("snapshots", "snapshots", 5),  # probe snapshots 2x ... 32x further apart
    Knob("stream", "stream", 5),  # stream frames at 1/2 ... 1/32 of the rate asked for
    Knob("views", "stream", 3),  # pooled views at 1/2 ... 1/8 of the side asked for
)
_KNOB = {k.name: k for k in KNOBS}

# Thin above this fraction of the budget, not at the budget itself: what the dashboard
# cannot measure (its helper threads slowing the training thread through shared caches
# and memory bandwidth, a snapshot's lump falling inside a short window) comes on top.
AIM = 0.8
# Recover only below this fraction of the budget (hysteresis) ...
RECOVER_BELOW = 0.5
# ... and only if doubling the restored knob's cost stays under this fraction of AIM.
RECOVER_MARGIN = 0.8
# A knob is thinned when its cost is at least this fraction of the excess (else the next).
SHARE_OF_EXCESS = 0.25
# At most this many levels at once: later windows measure before going further.
MAX_JUMP = 3
# Each window's measurement weighs this much against the windows before it.
SMOOTHING = 0.5
# One gap between steps moves the step-time average as a step this many times the
# average would (a pause is not a slower step).
STEP_TIME_JUMP = 2.0
# After a dropped history record (the writer behind), nothing is restored for this
# many windows: the writer's backlog is not in the measured times.
HOLD_AFTER_DROP = 4
# The smallest pooled view the budget makes (a 16 x 16 map still shows structure).
MIN_SIDE = 16


class FakeClock:
    """A clock for tests and doctests: ``clock()`` reads it, ``advance(s)`` moves it."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Budget:
    """Measures the dashboard's cost for one run and thins its work (module docstring).

    ``max_overhead``: dashboard time / training time allowed (None: measure and report,
    never thin). The training thread calls :meth:`step_begin`, :meth:`step_end` and
    :meth:`spend`; any thread calls :meth:`spend_helper`, :meth:`status`.
    """

    def __init__(self, max_overhead: float | None = 0.03, *, window_s: float = 2.0,
                 min_steps: int = 2, clock: Callable[[], float] = time.perf_counter) -> None:
        if max_overhead is not None and (isinstance(max_overhead, bool)
                                         or not isinstance(max_overhead, int | float)
                                         or not 0 < max_overhead <= 1):
            raise ValueError(f"max_overhead must be None or in (0, 1], got {max_overhead!r}")
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s!r}")
        if min_steps < 1:
            raise ValueError(f"min_steps must be >= 1, got {min_steps!r}")
        self.max_overhead = max_overhead
        self.window_s = window_s
        self.min_steps = min_steps
        self.clock = clock
        self.levels = {k.name: 0 for k in KNOBS}
        # Levels never restored below (set by the work's owner from a known cost, e.g. the
        # recorder from a probe pass's: see :meth:`hold_at_least`).
        self.floors = {k.name: 0 for k in KNOBS}
        # Dashboard time / training time over the last windows (smoothed; None: none yet),
        # and the same per component.
        self.overhead: float | None = None
        self.costs: dict[str, float] = {c: 0.0 for c in COMPONENTS}
        self.dropped = 0  # history records dropped (a full writer queue)
        self.step_time = 0.0  # moving average of a training step (dashboard excluded), s:
        # what spaces stream frames and snapshots on slow steps
        self.version = 0  # bumped whenever status() changes
        self._lock = threading.Lock()
        self._helper = dict.fromkeys(COMPONENTS, 0.0)  # guarded by _lock
        self._spent = dict.fromkeys(COMPONENTS, 0.0)  # training thread only
        self._since_end = 0.0  # dashboard time in the training thread since step_end
        self._last_end: float | None = None
        self._window_start: float | None = None
        self._steps = 0
        self._train = 0.0
        self._queue_full = False
        self._hold = 0  # windows left before restoring anything (after a full queue)
        self._fresh = True  # the next window starts the smoothing over
        self._total_cost = 0.0  # since the start, for overhead_total
        self._total_train = 0.0

    # -- what is thinned (read by the recorder, the publisher, the hub) ------------

    @property
    def stats_every(self) -> int:
        """History statistics are recorded every this many steps."""
        return 1 << self.levels["stats"]

    @property
    def snapshot_stride(self) -> int:
        """Snapshots are this many times further apart than ``history_every``."""
        return 1 << self.levels["snapshots"]

    @property
    def stream_factor(self) -> int:
        """The stream captures at most once per this many capture intervals."""
        return 1 << self.levels["stream"]

    def view_side(self, side: int) -> int:
        """The pooled view's side for a subscriber asking for ``side``."""
        return side if not self.levels["views"] else \
            max(min(side, MIN_SIDE), side >> self.levels["views"])

    # -- accounting ------------------------------------------------------------------

    def spend(self, component: str, seconds: float) -> None:
        """The training thread spent ``seconds`` (its CPU time) on ``component``'s work."""
        self._spent[component] += seconds
        self._since_end += seconds

    def spend_helper(self, component: str, seconds: float) -> None:
        """A helper thread used ``seconds`` of CPU on ``component``'s work (any thread)."""
        with self._lock:
            self._helper[component] += seconds

    def queue_full(self) -> None:
        """A history record was dropped (the writer is behind): thin at the next window."""
        self.dropped += 1
        self._queue_full = True

    def step_begin(self) -> None:
        """``Run.step`` starts: the time since the last one ended, less the dashboard's
        share, was training."""
        now = self.clock()
        if self._last_end is not None:
            took = max(0.0, now - self._last_end - self._since_end)
            self._train += took
            self._steps += 1
            # A gap between steps (an evaluation loop, a paused script) counts at most
            # STEP_TIME_JUMP steps: it would otherwise space frames and snapshots as if
            # every step took that long (a viewer saw no frame for minutes after one).
            # A real change of speed is followed, by up to 10 % a step.
            self.step_time = took if not self.step_time else \
                0.9 * self.step_time + 0.1 * min(took, STEP_TIME_JUMP * self.step_time)

    def step_end(self) -> None:
        """``Run.step`` ends (its hooks and any pause included): maybe close a window."""
        now = self._last_end = self.clock()
        self._since_end = 0.0
        start = self._window_start
        if start is None:  # the first step: windows start here (nothing before counts)
            self._spent = dict.fromkeys(COMPONENTS, 0.0)
            with self._lock:
                self._helper = dict.fromkeys(COMPONENTS, 0.0)
            self._window_start = now
        elif now - start >= self.window_s and self._steps >= self.min_steps:
            self._close_window()
            self._window_start = self.clock()

    def _close_window(self) -> None:
        with self._lock:
            helper, self._helper = self._helper, dict.fromkeys(COMPONENTS, 0.0)
        costs = {c: self._spent[c] + helper[c] for c in COMPONENTS}
        self._spent = dict.fromkeys(COMPONENTS, 0.0)
        train, self._train, self._steps = self._train, 0.0, 0
        queue_full, self._queue_full = self._queue_full, False
        if train <= 0:
            return
        total = sum(costs.values())
        self._total_cost += total
        self._total_train += train
        # Smoothed over windows (helper threads work in bursts), restarted after a change
        # so that what was thinned is judged on its own measurements.
        shares = {c: v / train for c, v in costs.items()}
        if not self._fresh:
            shares = {c: SMOOTHING * v + (1 - SMOOTHING) * self.costs[c]
                      for c, v in shares.items()}
        self._fresh = False
        self.costs = shares
        self.overhead = sum(shares.values())
        self.version += 1
        if self.max_overhead is not None:
            self._decide(self.costs, self.overhead, self.max_overhead, queue_full)

    # -- the controller ----------------------------------------------------------------

    def _decide(self, costs: dict[str, float], overhead: float, budget: float,
                queue_full: bool) -> None:
        limit = AIM * budget
        if overhead > limit or queue_full:
            excess = max(overhead - limit, 0.0)
            knob, levels = self._choose(costs, overhead, excess, queue_full)
            if knob is not None:
                self._thin(knob, levels, overhead)
            if queue_full:
                self._hold = HOLD_AFTER_DROP
        elif self._hold > 0:
            self._hold -= 1
        elif overhead < budget * RECOVER_BELOW:
            # What a viewer misses most first: views, the stream, snapshots, statistics;
            # one level, if doubling that part of the cost still fits well.
            for knob in reversed(KNOBS):
                if self.levels[knob.name] > self.floors[knob.name] and \
                        overhead + costs[knob.component] <= limit * RECOVER_MARGIN:
                    self._restore(knob, overhead)
                    break

    def _choose(self, costs: dict[str, float], overhead: float, excess: float,
                queue_full: bool) -> tuple[Knob | None, int]:
        open_knobs = [k for k in KNOBS if self.levels[k.name] < k.limit]
        if not open_knobs:
            return None, 0
        if queue_full and excess == 0:  # the writer is behind: less history work
            history = [k for k in open_knobs if k.component in ("stats", "snapshots")]
            return (history[0], 1) if history else (None, 0)
        chosen = next((k for k in open_knobs if costs[k.component] > 0
                       and costs[k.component] >= SHARE_OF_EXCESS * excess), None)
        if chosen is None:  # nothing covers enough of it alone: the costliest part
            chosen = max(open_knobs, key=lambda k: costs[k.component])
        cost = costs[chosen.component]
        left = max(cost - excess, cost / (1 << MAX_JUMP), 1e-12)
        levels = math.ceil(math.log2(cost / left)) if cost > 0 else 1
        return chosen, max(1, min(levels, MAX_JUMP, chosen.limit - self.levels[chosen.name]))

    def hold_at_least(self, name: str, level: int) -> None:
        """Keep knob ``name`` at ``level`` or above (capped at its limit) from now on: its
        work's owner knows the cost before the windows measure it."""
        level = max(0, min(level, _KNOB[name].limit))
        self.floors[name] = level
        if self.levels[name] < level:
            self.levels[name] = level
            self._fresh = True
            self.version += 1
            logger.info("attnscope budget: %s", self.text())

    def _thin(self, knob: Knob, levels: int, overhead: float) -> None:
        self.levels[knob.name] += levels
        self._fresh = True
        self.version += 1
        logger.info("attnscope budget: %s (dashboard at %.1f %% of training time)",
                    self.text(overhead), 100 * overhead)

    def _restore(self, knob: Knob, overhead: float) -> None:
        self.levels[knob.name] -= 1
        self._fresh = True
        self.version += 1
        logger.info("attnscope budget: %s", self.text(overhead))

    # -- what a person reads -----------------------------------------------------------

    def thinned(self) -> list[str]:
        """What is thinned now, in words (empty: nothing)."""
        out = []
        if self.levels["stats"]:
            out.append(f"stats every {self.stats_every} steps")
        if self.levels["snapshots"]:
            out.append(f"snapshots {self.snapshot_stride}x further apart")
        if self.levels["stream"]:
            out.append(f"stream frames at 1/{self.stream_factor} rate")
        if self.levels["views"]:
            out.append(f"views at 1/{1 << self.levels['views']} size")
        return out

    def text(self, overhead: float | None = None) -> str:
        """One line: what is thinned and why, or what watching costs now."""
        overhead = self.overhead if overhead is None else overhead
        budget = "no budget" if self.max_overhead is None \
            else f"budget {_percent(self.max_overhead)} %"
        if overhead is None:
            return f"dashboard cost not measured yet ({budget})"
        now = f"{_percent(overhead)} %"
        thinned = self.thinned()
        if not thinned or self.max_overhead is None:
            return f"dashboard at {now} of training time ({budget})"
        return f"{', '.join(thinned)} to stay under {_percent(self.max_overhead)} % (now {now})"

    def totals(self) -> tuple[float, float]:
        """(dashboard seconds, training seconds) over the closed windows since the start:
        a benchmark takes their differences around the steps it measures."""
        return self._total_cost, self._total_train

    def status(self) -> dict[str, Any]:
        """The budget as JSON (the run's REST representation and the ``budget`` message)."""
        total = self._total_cost / self._total_train if self._total_train > 0 else None
        return {
            "max_overhead": self.max_overhead, "overhead": self.overhead,
            "overhead_total": total, "costs": dict(self.costs),
            "thinned": {"stats_every": self.stats_every,
                        "snapshot_stride": self.snapshot_stride,
                        "stream_factor": self.stream_factor,
                        "view_scale": 1.0 / (1 << self.levels["views"])},
            "thinning": self.thinned(), "dropped": self.dropped, "text": self.text(),
        }


def max_overhead_from_env(default: float = 0.03) -> float:
    """``ATTNSCOPE_MAX_OVERHEAD`` for a process without the server's settings
    (``Dashboard.connect``); ValueError naming it when it is not in (0, 1]."""
    raw = os.environ.get("ATTNSCOPE_MAX_OVERHEAD", "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise ValueError(f"ATTNSCOPE_MAX_OVERHEAD must be a number in (0, 1], got {raw!r}")
    return value


def _percent(fraction: float) -> str:
    """``0.03`` -> ``'3'``, ``0.105`` -> ``'10.5'``."""
    value = round(100 * fraction, 1)
    return f"{value:g}" if value >= 1 or value == 0 else f"{value:.1f}"


__all__ = ["COMPONENTS", "KNOBS", "Budget", "FakeClock", "Knob", "max_overhead_from_env"]
