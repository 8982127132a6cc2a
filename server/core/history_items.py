"""What the history records, as both processes see it: a step's record (:class:`StepItem`:
per layer sample 0's event copy, or its statistics reduced on a device) and a probe
snapshot (:class:`SnapshotItem`), the records computed elsewhere (:class:`StoredStats`,
:class:`StoredSnapshot`), the stored row (:class:`StatRow`), and the computations the
history writer makes of them (:func:`stats_of`, :func:`stat_rows`, a snapshot's arrays).

Shape legend: N batch, P probe samples, H heads, L queries, S keys, R statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from transformer_core.events import AttentionEvent
from transformer_core.events.portable import Portable

from .reduce import HostCopy, layer_statistics, pool_factor, pool_matrix
from .roles import repeat_scores
from .rowstats import MATRIX_UP_TO, STATS_ROWS, event_statistics
from .stats import HEAD_STATISTICS, MaskInfo, valid_key_counts, with_repeat_rows


@dataclass(frozen=True)
class StatRow:
    """One step's record: head statistics (layers, R, H) float32 (R = len(HEAD_STATISTICS), 5
    in sessions recorded before role scores; NaN padded) and scalars."""

    step: int
    time: float
    scalars: dict[str, float]
    heads: np.ndarray | None


@dataclass
class StepItem:
    """One step for the writer, per layer either sample 0's attention event as a copy (its
    queries and keys: the writer computes the statistics) or, when the model runs on a
    device, the statistics already reduced there and on their way to the host."""

    session: str
    step: int
    time: float
    scalars: dict[str, float]
    attention: dict[int, AttentionEvent]  # layer -> event of shape (1, H, L, S)
    n_layers: int
    stats: dict[int, HostCopy] = field(default_factory=dict)  # layer -> (R, H) float32

    @property
    def nbytes(self) -> int:
        """What the item holds in memory while it waits for the writer."""
        return sum(_copy_bytes(e) for e in self.attention.values()) + \
            sum(c.tensor.nbytes for c in self.stats.values())


def _copy_bytes(event: AttentionEvent | Portable) -> int:
    """Bytes held by a sample copy: its queries and keys, or (no recipe) its matrix."""
    if isinstance(event, Portable):
        return event.nbytes
    if event.queries is not None and event.keys is not None:
        return event.queries.nbytes + event.keys.nbytes
    return 4 * math.prod(event.shape)  # a float32 (1, H, L, S) matrix


@dataclass
class SnapshotItem:
    """One probe snapshot for the writer: per layer, its P probe samples' event copies."""

    session: str
    step: int
    time: float
    attention: dict[int, list[AttentionEvent]]  # layer -> P events of shape (1, H, L, S)
    labels: list[str] | None
    # layer -> P events (1, H, L, S) of the induction probe (the probe's first half twice)
    repeat: dict[int, list[AttentionEvent]] = field(default_factory=dict)
    max_side: int = 256  # the stored matrices' largest side (HistoryConfig.snapshot_max_side)

    @property
    def nbytes(self) -> int:
        """What the copies hold while they wait (the writer computes one layer's matrices
        at a time)."""
        return sum(_copy_bytes(e) for group in (self.attention, self.repeat)
                   for copies in group.values() for e in copies)

    def arrays(self) -> dict[str, np.ndarray]:
        """Computed here (the writer thread), one layer at a time, reduced where the copies
        are (on the GPU when training there) before anything is copied to the host:

        * ``attention.<layer>``: (P, H, L', S') float16, average-pooled to at most
          ``max_side`` per side;
        * ``repeat_scores.<layer>``: (P, 2, H) float32, the induction probe's induction and
          duplicate-token scores (:func:`~attnscope.core.roles.repeat_scores`), taken
          from the full-resolution matrix.
        """
        out = {f"attention.{layer}": _attention_of(copies, self.max_side).numpy()
               for layer, copies in self.attention.items()}
        for layer, copies in self.repeat.items():
            scores = _repeat_scores_of(copies)
            if scores is not None:
                out[f"repeat_scores.{layer}"] = scores.numpy()
        return out


@dataclass
class StoredStats:
    """Rows of head statistics computed elsewhere (a remote publisher's), to append."""

    session: str
    rows: list[StatRow]

    @property
    def nbytes(self) -> int:
        return sum(0 if r.heads is None else r.heads.nbytes for r in self.rows)


@dataclass
class StoredSnapshot:
    """A snapshot whose arrays were computed elsewhere (a remote publisher's)."""

    session: str
    step: int
    time: float
    tensors: dict[str, np.ndarray]  # attention.<layer>: (P, H, L, S) float16
    labels: list[str] | None

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.tensors.values())

    def arrays(self) -> dict[str, np.ndarray]:
        return self.tensors


def stat_rows(steps: list[StepItem], max_rows: int | None = STATS_ROWS
              ) -> dict[str, list[StatRow]]:
    """The stored rows of recorded steps, per session (their statistics computed here, over
    at most ``max_rows`` query rows per head: :func:`stats_of`)."""
    rows: dict[str, list[StatRow]] = {}
    for item, heads in zip(steps, stats_of(steps, max_rows), strict=True):
        rows.setdefault(item.session, []).append(StatRow(item.step, item.time, item.scalars, heads))
    return rows


def _on_cuda(event: AttentionEvent) -> bool:
    """Whether the event's tensors are on a CUDA device (its statistics are reduced there)."""
    return event.queries is not None and event.queries.is_cuda


def sample_statistics(event: AttentionEvent, sample: int) -> torch.Tensor:
    """:data:`HEAD_STATISTICS` (R, H) of one sample of ``event``, float32 on the event's
    device, without a host synchronisation (the attention (H, L, S) is computed there)."""
    a = event.attention(sample=sample)  # (H, L, S)
    L, S = a.shape[-2:]
    valid = valid_key_counts(MaskInfo.of(event), sample, L, S, on_device=True)
    return with_repeat_rows(layer_statistics(a, valid))  # (R, H)


def _attention_of(copies: list[AttentionEvent], max_side: int | None = None) -> torch.Tensor:
    """The (T, H, L, S) float16 CPU attention of T one-sample copies of one layer (as the
    stream sends it), computed in one go where their emitter can join them; average-pooled
    there to at most ``max_side`` per side (T, H, L', S') when given."""
    with torch.no_grad():
        a = AttentionEvent.concat(copies).attention()  # (T, H, L, S)
        factor = 1 if max_side is None else pool_factor(a.shape[-2], a.shape[-1], max_side)
        if factor > 1:
            a = pool_matrix(a.flatten(0, 1), factor).unflatten(0, a.shape[:2])  # (T, H, L', S')
        return a.to(torch.float16).cpu() if a.dtype != torch.float16 else a.to("cpu", copy=True)


def _repeat_scores_of(copies: list[AttentionEvent]) -> torch.Tensor | None:
    """(T, 2, H) induction and duplicate-token scores of T copies of one layer's event on
    the induction probe (its first half repeated: half = L // 2), computed where the copies
    are; None when the probe is too short to score."""
    with torch.no_grad():
        a = AttentionEvent.concat(copies).attention()  # (T, H, L, S)
        T, H, L, S = a.shape
        half = L // 2
        if half < 2 or 2 * half > min(L, S):
            return None
        return repeat_scores(a.flatten(0, 1), half).view(2, T, H).transpose(0, 1)  # (T, 2, H)


def stats_of(steps: list[StepItem], max_rows: int | None = STATS_ROWS
             ) -> list[np.ndarray | None]:
    """Head statistics (layers, R, H) of each step; NaN where a layer or head is missing.

    Statistics reduced on a device are waited for here. Those of sample copies are
    computed here, in float32, for every head. A copy whose matrix would hold more than
    ``MATRIX_UP_TO`` values, of an attention that describes its logits (softmax
    attentions), is reduced without the matrix, over at most ``max_rows`` query rows per
    head (:func:`~attnscope.core.rowstats.event_statistics`: fused kernels, any sequence
    length), the steps' copies of a layer joined into one call. Smaller ones, and
    attentions that do not describe their logits (linear, clustered...), from the matrix
    itself, the steps' copies joined into one attention computation and, without masks,
    reduced in one batched call.
    """
    out: list[np.ndarray | None] = []
    for item in steps:
        shapes = [e.shape[1] for e in item.attention.values()] + \
            [c.tensor.shape[1] for c in item.stats.values()]
        out.append(None if not shapes else
                   np.full((item.n_layers, len(HEAD_STATISTICS), max(shapes)), np.nan,
                           np.float32))
    by_layer: dict[tuple, list[tuple[int, AttentionEvent]]] = {}
    for k, item in enumerate(steps):
        for layer, copy in item.stats.items():
            rows = copy.wait().numpy()  # (R, H)
            out[k][layer, :, : rows.shape[1]] = rows
        for layer, event in item.attention.items():
            by_layer.setdefault((layer, event.shape), []).append((k, event))
    with torch.no_grad():
        for (layer, shape), members in by_layer.items():
            H = shape[1]
            events = [e for _, e in members]
            for (k, _), rows in zip(members, _layer_rows(events, max_rows), strict=True):
                out[k][layer, :, :H] = rows  # (R, H)
    return out


def _layer_rows(events: list[AttentionEvent], max_rows: int | None) -> list[np.ndarray]:
    """:data:`HEAD_STATISTICS` (R, H) of each one-sample copy of one layer's events: from
    their rows without the matrix past ``MATRIX_UP_TO`` values a copy, else (and for
    attentions that do not describe their logits) from the matrix."""
    joined = AttentionEvent.concat(events)
    H, L, S = joined.shape[1:]
    if H * L * S > MATRIX_UP_TO:
        if joined.scores is not None:  # one call for all steps
            return [with_repeat_rows(s).cpu().numpy()
                    for s in event_statistics(joined, max_rows, method="rows")]
        if all(e.scores is not None for e in events):  # masks differ between steps
            return [with_repeat_rows(event_statistics(e, max_rows, method="rows")[0])
                    .cpu().numpy() for e in events]
    attention = joined.attention()  # (T, H, L, S)
    valid = [valid_key_counts(MaskInfo.of(e), 0, L, S) for e in events]
    if all(v is None for v in valid):  # one call for all T steps
        H = joined.shape[1]
        rows = with_repeat_rows(layer_statistics(attention.flatten(0, 1))).cpu().numpy()
        return [rows[:, j * H: (j + 1) * H] for j in range(len(events))]
    return [with_repeat_rows(layer_statistics(a, v)).cpu().numpy()
            for a, v in zip(attention, valid, strict=True)]
