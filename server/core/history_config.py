"""Settings of the history recorder (read from the server's :class:`Settings`)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class HistoryConfig:
    """How often and how much of each run is recorded; ``validate`` names a bad field.

    Read from ``Settings`` fields ``history_<name>`` when present
    (``ATTNSCOPE_HISTORY_EVERY=...``), else these defaults.
    """

    # Record everything: a history is the point of the data dir.
    enabled: bool = True
    # A probe snapshot every 10 steps: one extra forward of the probe (1 sample, no
    # grad) per 10 training steps costs well under 1% of a training step.
    every: int = 10
    # ~200 snapshots per run (the figure); older ones are thinned logarithmically.
    max_snapshots: int = 200
    # Deprecated: the run's cost budget (``max_overhead``, attnscope.training.budget) spaces
    # snapshots with the rest of the dashboard's work. When set, probe passes alone also
    # stay under this share of the training time (snapshots at 2x, 4x, ... ``every``).
    probe_budget: float | None = None
    # 1 probe sample: the page shows one sample; scripts rarely need more.
    probe_samples: int = 1
    # Snapshots are average-pooled to at most 256 x 256 per head where they are computed
    # (on the GPU when training there): 12 x 12 heads at L=1024 are then 19 MB a snapshot
    # instead of 302 MB (and 604 MB to copy with the induction probe), and the page's
    # history frames are 128 px by default. The induction probe is reduced to its scores
    # at full resolution before that.
    snapshot_max_side: int = 256
    # Per-step head statistics of long sequences over 128 query rows per head, spread over
    # the sequence (each row exact, computed without the L x S matrix: docs/statistics.md):
    # 12 x 12 heads at L=8192 then fit the 3 % budget on a CPU at every step (256 rows
    # did not); 0: every row, whatever it costs.
    stats_rows: int = 128
    # Head statistics and scalars at every step, thinned by halving past this many points.
    max_stat_points: int = 20_000
    # 2 GiB of snapshot files over this server's own (local) runs; the fattest is thinned
    # first. Remote runs have their own quotas below and never evict a local run's data.
    max_bytes: int = 2 * 1024**3
    # Past local runs kept (the oldest local sessions are deleted first).
    max_sessions: int = 100
    # Per run id: 10 sessions (starts) kept, its oldest deleted first; 1 GiB of snapshots,
    # statistics and metadata (a 12 x 12 head model at 256 x 256 keeps ~50 snapshots),
    # its own older sessions evicted first, then its current one thinned.
    max_run_sessions: int = 10
    max_run_bytes: int = 1024**3
    # Remote runs whose history is kept: 32 x max_run_bytes is the most disk publishers can
    # use. A new one makes the store forget the one whose newest session is the oldest (not one
    # being recorded).
    max_remote_runs: int = 32
    # A publisher's session metadata, and a snapshot's probe labels, as JSON: the recorder's
    # metadata of a 1024-layer model is ~20 KiB; a 4096-token probe's labels ~40 KiB.
    max_meta_bytes: int = 64 * 1024
    # Records waiting for the writer (it writes 4 times a second); beyond this, or
    # beyond ``queue_bytes``, the training thread drops records (counted) rather than wait.
    queue_size: int = 4096
    # Bytes of copied attention waiting for the writer, at most (bounded memory).
    queue_bytes: int = 64 * 1024**2

    def validate(self) -> HistoryConfig:
        for name, low in (("every", 1), ("max_snapshots", 3), ("probe_samples", 1),
                          ("stats_rows", 0),
                          ("snapshot_max_side", 4),
                          ("max_stat_points", 4), ("max_bytes", 1), ("max_sessions", 1),
                          ("max_run_sessions", 1), ("max_run_bytes", 1), ("max_remote_runs", 1),
                          ("max_meta_bytes", 1024), ("queue_size", 1), ("queue_bytes", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"history_{name} must be an int >= {low}, got {value!r}")
        budget = self.probe_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int | float)
                                   or not 0 < budget <= 1):
            raise ValueError(f"history_probe_budget must be None or in (0, 1], got {budget!r}")
        return self

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> HistoryConfig:
        """Defaults, overridden by ``settings.history_<field>`` and then ``overrides``."""
        values = {f.name: getattr(settings, f"history_{f.name}") for f in fields(cls)
                  if hasattr(settings, f"history_{f.name}")}
        return cls(**{**values, **overrides}).validate()
