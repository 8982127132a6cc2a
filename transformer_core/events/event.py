"""Event payloads. Each event carries the module that emitted it as ``source``.

Shape legend: N batch, L queries, S keys, H heads, E query/key dimension per
head, D value dimension per head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .portable import Recipe
from .scores import SoftmaxScores

if TYPE_CHECKING:  # pragma: no cover
    from .statistics import RowStatistics

Index = int | Sequence[int] | slice | torch.Tensor | None
# (samples, heads) -> (n, h, L, S); samples/heads are a slice or a 1-D LongTensor.
SliceFn = Callable[[Any, Any], torch.Tensor]
# sample -> an AttentionEvent of that sample alone, owning copies (see sample_copy).
CopyFn = Callable[[int], "AttentionEvent"]
# events of one emitter -> one event of all their samples, or None (see concat).
ConcatFn = Callable[[Sequence["AttentionEvent"]], "AttentionEvent | None"]
# () -> what the logits are (see AttentionEvent.scores); built on first read.
ScoresFn = Callable[[], SoftmaxScores]


class Event:
    """Base class of every event: ``source`` is the module that dispatched it."""

    def __init__(self, source: Any) -> None:
        self.source = source


class QKVEvent(Event):
    """Queries (N, L, H, E), keys (N, S, H, E) and values (N, S, H, D) after projection.

    Dispatched by :class:`~transformer_core.attention.AttentionLayer`.
    """

    def __init__(self, source: Any, queries: Any, keys: Any, values: Any) -> None:
        super().__init__(source)
        self.queries = queries
        self.keys = keys
        self.values = values


class IntermediateOutput(Event):
    """The output ``x`` (N, L, D_model) of one transformer layer (its ``source``)."""

    def __init__(self, source: Any, x: torch.Tensor) -> None:
        super().__init__(source)
        self.x = x


def _as_indexer(index: Index, size: int, name: str) -> tuple[Any, bool]:
    """Turn a user index into (indexer keeping the dim, whether to squeeze that dim)."""
    if index is None:
        return slice(None), False
    if isinstance(index, slice):
        return index, False
    if isinstance(index, int) or (isinstance(index, torch.Tensor) and index.ndim == 0):
        i = int(index)
        if not -size <= i < size:
            raise IndexError(f"{name}={i} is out of range for {size} {name}s")
        return slice(i % size, i % size + 1), True
    idx = torch.as_tensor(list(index) if not isinstance(index, torch.Tensor) else index)
    if idx.dtype == torch.bool:
        idx = idx.nonzero().flatten()
    if idx.numel() and (idx.max() >= size or idx.min() < -size):
        raise IndexError(f"{name}s={idx.tolist()} out of range for {size} {name}s")
    return idx.long() % size, False


class AttentionEvent(Event):
    """The attention of one inner-attention module, computed only when read.

    The module that dispatches this event has already produced its output on a
    fused kernel without building the attention matrix. The event keeps what
    is needed to build it (queries, keys, masks, scale) and does so on demand:

    * :attr:`attention_matrix` (N, H, L, S) is computed on first access and cached;
    * :meth:`attention` ``(sample, heads)`` computes only the requested slice
      and equals ``attention_matrix[sample][heads]`` (or slices the cache);
    * :meth:`logits` gives the pre-normalisation scores of the same slice.

    The matrix is the normalised attention *before* dropout (dropout only acts
    on the output computation). Read under autograd, gradients flow from the
    matrix back to the queries and keys.

    ``matrix`` may pass a matrix the emitter already built (it is then the cache).
    ``role`` is ``"self"`` or ``"cross"`` (decoder cross-attention);
    ``attention_type`` names the inner attention (``"full"``, ``"linear"``...).
    ``copy_fn(sample)`` builds the event :meth:`sample_copy` returns (emitters give
    it; without it, :meth:`sample_copy` computes that sample's matrix right away);
    ``concat_fn(events)`` joins events of this emitter for :meth:`concat`.
    ``recipe`` (a :class:`~transformer_core.events.portable.Recipe`) says how to build the
    event again from data, in another process (:mod:`transformer_core.events.portable`).
    ``scores_fn()`` describes the logits of an attention that is exactly their softmax
    (:attr:`scores`, read by :meth:`row_statistics`); emitters of other attentions
    (linear, clustered...) leave it out.
    """

    def __init__(
        self,
        source: Any,
        shape: tuple[int, int, int, int],
        logits_fn: SliceFn,
        matrix_fn: SliceFn | None = None,
        *,
        queries: torch.Tensor | None = None,
        keys: torch.Tensor | None = None,
        attn_mask: Any = None,
        key_lengths: Any = None,
        softmax_temp: float | None = None,
        role: str = "self",
        attention_type: str = "full",
        matrix: torch.Tensor | None = None,
        copy_fn: CopyFn | None = None,
        concat_fn: ConcatFn | None = None,
        recipe: Recipe | None = None,
        scores_fn: ScoresFn | None = None,
    ) -> None:
        super().__init__(source)
        self.shape = tuple(shape)
        self.queries = queries
        self.keys = keys
        self.attn_mask = attn_mask
        self.key_lengths = key_lengths
        self.softmax_temp = softmax_temp
        self.role = role
        self.attention_type = attention_type
        self._logits_fn = logits_fn
        self._matrix_fn = matrix_fn or (lambda n, h: torch.softmax(logits_fn(n, h), dim=-1))
        self._matrix = matrix  # (N, H, L, S) when the emitter already built it
        self._copy_fn = copy_fn
        self._concat_fn = concat_fn
        self.recipe = recipe
        self._scores_fn = scores_fn
        self._scores: SoftmaxScores | None = None

    @property
    def is_cross(self) -> bool:
        """True for decoder cross-attention (queries from the target, keys from memory)."""
        return self.role == "cross"

    @property
    def attention_matrix(self) -> torch.Tensor:
        """The full attention matrix (N, H, L, S); computed once, then cached."""
        if self._matrix is None:
            self._matrix = self._matrix_fn(slice(None), slice(None))
        return self._matrix

    def attention(self, sample: Index = None, heads: Index = None) -> torch.Tensor:
        """``attention_matrix[sample][heads]``, computing only that slice.

        ``sample`` and ``heads`` are each an int (that dimension is dropped), a
        list or 1-D tensor of indices, a slice, or None (all). Examples:
        ``attention(sample=0)`` is (H, L, S); ``attention(0, [1, 3])`` is
        (2, L, S); ``attention(heads=2)`` is (N, L, S).
        """
        return self._sliced(self._matrix_fn, sample, heads, cache=self._matrix)

    def logits(self, sample: Index = None, heads: Index = None) -> torch.Tensor:
        """Pre-normalisation scores of the same slice as :meth:`attention`.

        For softmax attentions these are the scaled dot products with masked
        positions at ``-inf``; for linear attentions the log of the feature-map
        dot products. In both cases ``softmax(logits, -1)`` is the matrix, except
        for a query whose keys are all masked: its logits are all ``-inf`` and its
        matrix row is all zeros (the fused kernel's zero output), not NaN.
        """
        return self._sliced(self._logits_fn, sample, heads, cache=None)

    @property
    def scores(self) -> SoftmaxScores | None:
        """What the logits are (:class:`~.scores.SoftmaxScores`: queries, keys, scale,
        masks, band, bias, soft cap) when the attention is exactly their softmax, built
        on first read; None for attentions that are not (linear, clustered, top-k...)."""
        if self._scores is None and self._scores_fn is not None:
            self._scores = self._scores_fn()
        return self._scores

    def row_statistics(self, sample: Index = None, heads: Index = None,
                       rows: torch.Tensor | None = None, **options: Any) -> RowStatistics:
        """Entropy, log-sum-exp and visible keys (n, h, R) of query ``rows`` (None: all),
        without the L x S matrix where the emitter describes its logits
        (:func:`~.statistics.row_statistics`, which takes the ``options``). Every
        dimension is kept: ``row_statistics(sample=0).entropy`` is (1, H, L).
        """
        from .statistics import row_statistics

        return row_statistics(self, sample, heads, rows, **options)

    def sample_copy(self, sample: int) -> AttentionEvent:
        """This event for ``sample`` alone (shape (1, H, L, S)), owning detached copies of
        what it needs: read it later, or in another thread, after the model has moved on.

        An emitter's copy holds that sample's queries and keys (and mask rows), not the
        matrix: taking it costs a copy of (L + S) x H x E values and no attention
        computation, and reading it computes the same values as reading this event.
        """
        n, _ = _as_indexer(int(sample), self.shape[0], "sample")
        if self._copy_fn is not None:
            return self._copy_fn(n.start)
        with torch.no_grad():  # no recipe from the emitter: compute that sample now
            matrix = self.attention(n).detach().clone()  # (1, H, L, S)
            logits = self.logits(n).detach().clone()  # (1, H, L, S)
        return AttentionEvent(self.source, (1, *self.shape[1:]), lambda s, h: logits[s][:, h],
                              lambda s, h: matrix[s][:, h], role=self.role,
                              attention_type=self.attention_type, matrix=matrix,
                              recipe=Recipe("matrix", {}, {"matrix": matrix, "logits": logits}))

    @staticmethod
    def concat(events: Sequence[AttentionEvent]) -> AttentionEvent:
        """Events of equal (H, L, S) as one event of all their samples, (sum N, H, L, S).

        Reading it equals reading each event and concatenating. Sample copies of
        one module (a recorder's steps) are joined by their emitter, so that the
        whole batch is computed at once instead of one small computation per event.
        """
        first = events[0]
        if len(events) == 1:
            return first
        if first._concat_fn is not None and all(e.source is first.source for e in events):
            joined = first._concat_fn(events)
            if joined is not None:
                return joined
        shape = (sum(e.shape[0] for e in events), *first.shape[1:])
        return AttentionEvent(
            first.source, shape,
            lambda s, h: torch.cat([e.logits(heads=h) for e in events])[s],
            lambda s, h: torch.cat([e.attention(heads=h) for e in events])[s],
            role=first.role, attention_type=first.attention_type)

    def _sliced(self, fn: SliceFn, sample: Index, heads: Index, cache: torch.Tensor | None):
        n_idx, drop_n = _as_indexer(sample, self.shape[0], "sample")
        h_idx, drop_h = _as_indexer(heads, self.shape[1], "head")
        # (n, h, L, S): a slice of the cache when there is one, else computed
        out = cache[n_idx][:, h_idx] if cache is not None else fn(n_idx, h_idx)
        if drop_h:
            out = out[:, 0]
        if drop_n:
            out = out[0]
        return out

    def __repr__(self) -> str:
        return (
            f"AttentionEvent(type={self.attention_type!r}, role={self.role!r}, "
            f"shape={self.shape}, computed={self._matrix is not None})"
        )
