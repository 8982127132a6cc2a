"""The dashboard's cost budget: what watching costs the training loop, and what it thins.

Two limits: ``max_overhead`` while someone watches the run (a page or a client subscribed
to it), ``idle_overhead`` (smaller) while nobody does, when only the history is recorded.

One :class:`Budget` per run. The dashboard's code in the training thread (the history
recorder's and the stream publisher's event handlers and step hooks) adds the CPU time
it used (``time.thread_time()``: on a busy machine, being preempted is not the
dashboard's cost) with :meth:`Budget.spend`; its helper threads (the history writer,
the event loop's encoding) add theirs with :meth:`Budget.spend_helper`. Training time
is measured by ``Run.step`` (:meth:`Budget.step_begin`, :meth:`Budget.step_end`): from
the end of one ``step()`` to the start of the next, less the dashboard's time in
between. Per window (``window_s`` seconds, ``min_steps`` steps) the overhead is
dashboard time / training time. docs/budget.md tells the whole story.

Over 80 % of the limit in force (``AIM``: room for what it cannot measure) the budget
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
from collections import deque
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


# The measured slowdown (:class:`SlowdownProbe`): the training side is switched off for
# PROBE_OFF_STEPS steps every PROBE_EVERY steps (3 % of steps without frames or statistics)
# and those steps' times are compared with as many steps on each side of them.
PROBE_EVERY = 64
PROBE_OFF_STEPS = 2
# The first off window comes after this many steps (warm-up: allocations, a first snapshot);
# after a change, windows come every PROBE_SOON steps until a figure is known again.
PROBE_START = 16
PROBE_SOON = 8
# Windows kept; a figure needs at least PROBE_MIN of them (since the last change).
PROBE_KEEP = 8
PROBE_MIN = 3
# A window holding a step this many times the others' median (a pause, an evaluation
# loop) says nothing about the dashboard: dropped.
PROBE_OUTLIER = 3.0
# The measured slowdown / the CPU accounting's figure: how far the calibration may go
# (CPU time of another process may cost the training loop nothing, or far more).
CALIBRATION_RANGE = (0.1, 4.0)


class SlowdownProbe:
    """The dashboard's real cost to the training loop, measured: for ``off_steps`` steps
    every ``every`` steps the training side does nothing (:attr:`off`), and the mean time
    of the ``off_steps`` steps on each side of them, over theirs, less 1, is one sample of
    the slowdown. What CPU-time accounting cannot see (another thread holding the GIL,
    more kernels per layer, a process competing for cores) shows here.

    >>> probe = SlowdownProbe(every=4, off_steps=1, start=2)
    >>> for _ in range(40):  # steps of 1.0 s, 1.1 s while the dashboard works
    ...     probe.step(1.0 if probe.off else 1.1, active=True)
    >>> round(probe.slowdown[0], 3), probe.slowdown[2]
    (0.1, 8)
    """

    def __init__(self, every: int = PROBE_EVERY, off_steps: int = PROBE_OFF_STEPS,
                 start: int = PROBE_START, keep: int = PROBE_KEEP) -> None:
        if every <= 2 * off_steps or off_steps < 1:
            raise ValueError(f"every must exceed 2 * off_steps >= 2, got {every}, {off_steps}")
        self.every, self.off_steps = every, off_steps
        self.off = False  # the step now running runs without the dashboard
        self.samples: deque[float] = deque(maxlen=keep)
        self._recent: deque[tuple[bool, float]] = deque(maxlen=3 * off_steps)
        self._until_off = start
        self._left = 0  # off steps left in this window
        self._after = -1  # on steps to wait before judging the last window (-1: none)
        self.count = 0  # samples ever taken

    def step(self, period: float, active: bool, lump: bool = False) -> None:
        """A step of ``period`` seconds ended (it ran with :attr:`off` as it is); ``active``:
        the dashboard had work to switch off; ``lump``: the step held a lump of work that is
        accounted otherwise (a snapshot's probe passes: that step is left out of its window).
        Decides whether the next step is off."""
        self._recent.append((self.off, math.inf if lump else period))
        if self._after > 0:
            self._after -= 1
            if self._after == 0:
                self._judge()
        if self.off:
            self._left -= 1
            if self._left == 0:
                self.off = False
                self._after = self.off_steps
            return
        self._until_off -= 1
        if self._until_off <= 0 and active and self._after <= 0:
            self.off = True
            self._left = self.off_steps
            self._until_off = self.every if len(self.samples) + 1 >= PROBE_MIN \
                else min(PROBE_SOON, self.every)

    def _judge(self) -> None:
        if len(self._recent) < 3 * self.off_steps:
            return
        # A lump step (a snapshot, charged on its own) is left out of the comparison.
        periods = [p for _, p in self._recent if p < math.inf]
        if not periods:
            return
        median = sorted(periods)[len(periods) // 2]
        if median <= 0 or max(periods) > PROBE_OUTLIER * median:
            return
        on = [p for off, p in self._recent if not off and p < math.inf]
        off = [p for off, p in self._recent if off and p < math.inf]
        if len(off) != self.off_steps or not on:
            return
        self.samples.append((sum(on) / len(on)) / (sum(off) / len(off)) - 1.0)
        self.count += 1

    def reset(self) -> None:
        """The dashboard's work changed (thinned or restored): older samples no longer apply,
        and the next ones are taken soon (every ``PROBE_SOON`` steps until there are enough)."""
        self.samples.clear()
        self._until_off = min(self._until_off, PROBE_SOON, self.every)

    @property
    def slowdown(self) -> tuple[float, float, int] | None:
        """(slowdown, its standard error, samples), or None before ``PROBE_MIN`` samples. The
        median of the samples (one step's noise on a shared machine is as large as the
        effect), its error estimated from their median absolute deviation."""
        n = len(self.samples)
        if n < PROBE_MIN:
            return None
        return (*median_and_error(list(self.samples)), n)


def median_and_error(values: list[float]) -> tuple[float, float]:
    """The median of ``values`` and its standard error, estimated from their median
    absolute deviation (one stray sample, a step that met a garbage collection, does not
    make the figure useless), scaled to a standard deviation (1.4826) and to the median's
    error (1.25 / sqrt(n)).

    >>> [round(x, 4) for x in median_and_error([0.97, 0.99, 1.0, 0.98, 1.01])]
    [0.99, 0.0083]
    """
    median = _median(values)
    mad = _median([abs(x - median) for x in values])
    return median, 1.25 * 1.4826 * mad / math.sqrt(len(values))


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return (ordered[(n - 1) // 2] + ordered[n // 2]) / 2


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

    ``max_overhead``: dashboard time / training time allowed while the run is watched
    (None: measure and report, never thin); ``idle_overhead``: allowed while nobody
    watches (:meth:`set_watched`; None: ``max_overhead``, and never above it). The
    training thread calls :meth:`step_begin`, :meth:`step_end` and
    :meth:`spend`; any thread calls :meth:`spend_helper`, :meth:`status`.
    """

    def __init__(self, max_overhead: float | None = 0.03, *, idle_overhead: float | None = None,
                 window_s: float = 2.0, min_steps: int = 2,
                 clock: Callable[[], float] = time.perf_counter,
                 probe: SlowdownProbe | None | bool = True) -> None:
        for name, value in (("max_overhead", max_overhead), ("idle_overhead", idle_overhead)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                      or not 0 < value <= 1):
                raise ValueError(f"{name} must be None or in (0, 1], got {value!r}")
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s!r}")
        if min_steps < 1:
            raise ValueError(f"min_steps must be >= 1, got {min_steps!r}")
        self.max_overhead = max_overhead
        self.idle_overhead = idle_overhead
        self.watched = False  # someone watches the run (its stream has subscribers)
        self._want_watched = False  # ... as last said by set_watched (any thread)
        # The measured slowdown (off windows), where there is a budget to keep: None for
        # a measure-only budget (nothing to decide; every step keeps its frames and stats).
        # (1, or no budget: nothing is ever thinned, so nothing is switched off either)
        self.probe: SlowdownProbe | None = (SlowdownProbe() if probe is True else probe or None) \
            if max_overhead is not None and max_overhead < 1 else None
        # measured slowdown / CPU accounting, from the last confident measurement: scales
        # the CPU accounting between measurements (1 until one is taken)
        self.calibration = 1.0
        self.cpu_overhead: float | None = None  # the CPU accounting alone (smoothed)
        self.source = "cpu"  # what ``overhead`` is: "cpu", "calibrated" or "measured"
        self._decided_on = 0  # the probe sample count the last decision used
        self._step_spent = 0.0  # dashboard time in the training thread during this step
        self._working = False  # the dashboard did something this step (spend() was called)
        self._lump = False  # this step held a lump (a snapshot): not a slowdown sample
        self._window_working = False  # ... in this window
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

    # -- the limit in force -------------------------------------------------------------

    @property
    def limit(self) -> float | None:
        """The overhead allowed now: ``max_overhead`` while watched, else ``idle_overhead``
        (never above ``max_overhead``; None: no limit)."""
        if self.max_overhead is None or self.max_overhead >= 1 or self.watched \
                or self.idle_overhead is None:  # (1: never thin, watched or not)
            return self.max_overhead
        return min(self.idle_overhead, self.max_overhead)

    def set_watched(self, watched: bool) -> None:
        """Someone started (True) or stopped (False) watching the run (any thread; applied
        at the training thread's next :meth:`step_end`): the limit in force changes
        (:attr:`limit`), and so does the dashboard's work (the stream's), so measurements
        start over and the next window decides against the new limit.

        >>> b = Budget(0.03, idle_overhead=0.01)
        >>> b.limit
        0.01
        >>> b.set_watched(True); b.step_begin(); b.step_end(); b.limit
        0.03
        """
        self._want_watched = bool(watched)

    def _apply_watched(self) -> None:
        self.watched = self._want_watched
        self._decided_on = -1  # the evidence so far was judged against the other limit
        self._changed()
        self.version += 1

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

    @property
    def off(self) -> bool:
        """True while the training side is switched off to measure the slowdown
        (:class:`SlowdownProbe`): handlers and step hooks do nothing this step."""
        return self.probe is not None and self.probe.off

    def view_side(self, side: int) -> int:
        """The pooled view's side for a subscriber asking for ``side``."""
        return side if not self.levels["views"] else \
            max(min(side, MIN_SIDE), side >> self.levels["views"])

    # -- accounting ------------------------------------------------------------------

    def spend(self, component: str, seconds: float) -> None:
        """The training thread spent ``seconds`` (its CPU time) on ``component``'s work."""
        self._spent[component] += seconds
        self._since_end += seconds
        self._step_spent += seconds
        self._working = True

    def spend_helper(self, component: str, seconds: float) -> None:
        """A helper thread used ``seconds`` of CPU on ``component``'s work (any thread)."""
        with self._lock:
            self._helper[component] += seconds

    def lump(self) -> None:
        """This step holds a lump of work accounted on its own (a snapshot's probe passes,
        charged spread over the steps between snapshots): no slowdown sample includes it."""
        self._lump = True

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
        now = self.clock()
        if self._want_watched != self.watched:
            self._apply_watched()
        if self.probe is not None and self._last_end is not None:
            self.probe.step(now - self._last_end, active=self._working, lump=self._lump)
        self._lump = False
        self._window_working = self._window_working or self._working
        self._last_end = now
        self._step_spent = 0.0
        self._working = False
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
        working, self._window_working = self._window_working, False
        if self.probe is not None and not working:
            self.probe.reset()  # nothing done: a slowdown measured before no longer holds
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
        self.cpu_overhead = sum(shares.values())
        measured = None if self.probe is None else self.probe.slowdown
        restore = True
        limit = self.limit
        if self._hold > 0 and not queue_full:
            self._hold -= 1  # windows, whatever the evidence
        if measured is not None and limit is not None:
            # Acted on when precise enough, or when clearly over the budget even so (a
            # cost paid every k-th step makes samples of 0 and of k times the mean);
            # otherwise too noisy (a busy machine): more samples first.
            value, error, _ = measured
            clearly_over = value - error > AIM * limit
            if error > limit and not clearly_over:
                measured = None
        if measured is not None:
            # What thinning acts on is the slowdown itself; it also calibrates the CPU
            # accounting used while the next measurement is made (after a change, say).
            self.overhead, self.source = max(measured[0], 0.0), "measured"
            if self.cpu_overhead > 0:
                low, high = CALIBRATION_RANGE
                self.calibration = min(high, max(low, self.overhead / self.cpu_overhead))
            if self.probe.count == self._decided_on and not queue_full:
                self.version += 1
                return  # decided on this evidence already: wait for the next sample
            self._decided_on = self.probe.count
        else:
            self.overhead = self.calibration * self.cpu_overhead
            self.source = "cpu" if self.calibration == 1.0 else "calibrated"
            # Once a slowdown has been measured, only a measurement restores work: CPU
            # accounting may miss what the dashboard costs (it thins, never restores).
            restore = self.probe is None or self.probe.count == 0
        self.version += 1
        if limit is not None:
            # Each component's share, scaled as the overhead was.
            scale = self.overhead / self.cpu_overhead if self.cpu_overhead > 0 else 1.0
            self._decide({c: v * scale for c, v in self.costs.items()}, self.overhead,
                         limit, queue_full, restore)

    # -- the controller ----------------------------------------------------------------

    def _decide(self, costs: dict[str, float], overhead: float, budget: float,
                queue_full: bool, restore: bool = True) -> None:
        limit = AIM * budget
        if overhead > limit or queue_full:
            excess = max(overhead - limit, 0.0)
            knob, levels = self._choose(costs, overhead, excess, queue_full)
            if knob is not None:
                self._thin(knob, levels, overhead)
            if queue_full:
                self._hold = HOLD_AFTER_DROP
        elif self._hold > 0:
            pass  # a record was dropped lately: nothing is restored yet
        elif overhead < budget * RECOVER_BELOW and restore:
            # What a viewer misses most first: views, the stream, snapshots, statistics;
            # one level, if doubling that part of the cost still fits well.
            for knob in reversed(KNOBS):
                if self.levels[knob.name] > self.floors[knob.name] and \
                        overhead + costs[knob.component] <= limit * RECOVER_MARGIN:
                    self._restore(knob, overhead)
                    break

    def _choose(self, costs: dict[str, float], overhead: float, excess: float,
                queue_full: bool) -> tuple[Knob | None, int]:
        # While nobody watches, the stream has no work to thin: thinning it anyway (the
        # history's knobs at their limits) would greet the next viewer with a slow,
        # coarse stream restored one window at a time.
        open_knobs = [k for k in KNOBS if self.levels[k.name] < k.limit
                      and (self.watched or k.component != "stream" or costs["stream"] > 0)]
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
            self._changed()
            self.version += 1
            logger.info("attnscope budget: %s", self.text())

    def _changed(self) -> None:
        """The dashboard's work changed: smoothing and the measured slowdown start over."""
        self._fresh = True
        if self.probe is not None:
            self.probe.reset()

    def _thin(self, knob: Knob, levels: int, overhead: float) -> None:
        self.levels[knob.name] += levels
        self._changed()
        self.version += 1
        logger.info("attnscope budget: %s (dashboard at %.1f %% of training time)",
                    self.text(overhead), 100 * overhead)

    def _restore(self, knob: Knob, overhead: float) -> None:
        self.levels[knob.name] -= 1
        self._changed()
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
        limit = self.limit
        budget = "no budget" if limit is None else f"budget {_percent(limit)} %{self._idle_words()}"
        if overhead is None:
            return f"dashboard cost not measured yet ({budget})"
        measured = None if self.probe is None else self.probe.slowdown
        now = f"{_percent(overhead)} %"
        if measured is not None and self.source != "measured":
            budget += f"; measured {_percent(max(measured[0], 0.0))} ± {_percent(measured[1])} %"
        if measured is not None and self.source == "measured":
            now = f"{_percent(overhead)} ± {_percent(measured[1])} %"
            budget = f"measured; {budget}"
        thinned = self.thinned()
        if not thinned or limit is None:
            return f"dashboard at {now} of training time ({budget})"
        how = ", measured" if measured is not None and self.source == "measured" else ""
        return (f"{', '.join(thinned)} to stay under {_percent(limit)} %{self._idle_words()} "
                f"(now {now}{how})")

    def _idle_words(self) -> str:
        """' while nobody watches' when the idle limit is the one in force."""
        return " while nobody watches" if self.limit != self.max_overhead else ""

    def totals(self) -> tuple[float, float]:
        """(dashboard seconds, training seconds) over the closed windows since the start:
        a benchmark takes their differences around the steps it measures."""
        return self._total_cost, self._total_train

    def status(self) -> dict[str, Any]:
        """The budget as JSON (the run's REST representation and the ``budget`` message)."""
        total = self._total_cost / self._total_train if self._total_train > 0 else None
        measured = None if self.probe is None else self.probe.slowdown
        return {
            "max_overhead": self.max_overhead, "idle_overhead": self.idle_overhead,
            "limit": self.limit, "watched": self.watched, "overhead": self.overhead,
            "overhead_total": total, "costs": dict(self.costs),
            "thinned": {"stats_every": self.stats_every,
                        "snapshot_stride": self.snapshot_stride,
                        "stream_factor": self.stream_factor,
                        "view_scale": 1.0 / (1 << self.levels["views"])},
            "thinning": self.thinned(), "dropped": self.dropped, "text": self.text(),
            "cpu_overhead": self.cpu_overhead, "source": self.source,
            "calibration": self.calibration, "measured": None if measured is None else {
                "slowdown": measured[0], "error": measured[1], "windows": measured[2]},
        }


def overhead_from_env(setting: str, default: float) -> float:
    """``ATTNSCOPE_<SETTING>`` (``max_overhead``, ``idle_overhead``) for a process without
    the server's settings (``Dashboard.connect``), else ``default``; ValueError naming the
    variable when it is not a number in (0, 1].

    >>> overhead_from_env("idle_overhead", 0.01)
    0.01
    """
    variable = f"ATTNSCOPE_{setting.upper()}"
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise ValueError(f"{variable} must be a number in (0, 1], got {raw!r}")
    return value


def _percent(fraction: float) -> str:
    """``0.03`` -> ``'3'``, ``0.105`` -> ``'10.5'``."""
    value = round(100 * fraction, 1)
    return f"{value:g}" if value >= 1 or value == 0 else f"{value:.1f}"


__all__ = ["COMPONENTS", "KNOBS", "Budget", "FakeClock", "Knob", "median_and_error",
           "overhead_from_env"]
