"""Recurrent inference on the stream: single query rows grown into the matrix of the sequence.

A recurrent site (``transformer_core.recurrent``) emits one query row per generated
token: attention (h, 1, S), S the keys so far (self) or the memory (cross). A
:class:`RowStore` turns a slot's rows into the matrix of the sequence so far,
(h, R, S_max), row r being the r-th token's (keys past a row's own S are 0 in
attention, -inf in logits: the causal batch matrix's values), and qkv norms
(3, h, 1) into (3, h, R). It lives in the training thread beside the publisher.

A new sequence starts (all rows dropped) when the step index goes back, when
:meth:`attnscope.training.run.Run.new_sequence` was called, when a self-attention's keys
stop growing, or a cross-attention's memory changes length. Memory is bounded:
past ``max_rows`` rows the oldest row drops off (the slot shows the last
``max_rows`` tokens against every key so far); a slot's buffer has at most 1.25x
(plus 17) the rows and keys of the matrix it shows.
Shape legend: h heads, R rows (tokens), S keys.

>>> store = RowStore()
>>> def row(s):  # one head, one query row over s keys, all weight on the last
...     return Capture("attention", 0, 0, (0,), torch.eye(s)[-1:][None], "self", 0.0)
>>> store.begin(0, 0)
>>> for s in (1, 2, 3):
...     cap = store.add(("attention", 0, 0), row(s), ["a", "b", "c"][s - 1])
>>> cap.data[0].tolist(), cap.labels
([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], (['a', 'b', 'c'], ['a', 'b', 'c']))
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from transformer_core.masking import FullMask

from ..contract.plan import Capture, SlotKey
from ..core.stats import MaskInfo

# The protocol's largest max_side: no view shows more rows than this without pooling.
MAX_ROWS = 1024
# What keys past a row's own S hold, per kind: what the causal batch matrix holds there.
_FILL = {"attention": 0.0, "head_stats": 0.0, "qk_logits": float("-inf")}


class _Grid:
    """Append-only rows (lead, 1, S) in a (lead, capacity, keys) buffer. A view handed out
    is never written again (rows go below it; growing copies into a new buffer), so the
    event loop may encode it while the next row comes in."""

    def __init__(self, first: torch.Tensor, fill: float, max_rows: int) -> None:
        self.fill, self.max_rows = fill, max_rows
        self.capacity = max_rows + max(1, max_rows // 4)  # rows; 1/4 room: a copy per R/4
        self.buf = self._alloc(first, min(16, self.capacity), first.shape[-1])
        self.start = self.end = self.keys = 0

    def _alloc(self, like: torch.Tensor, rows: int, keys: int) -> torch.Tensor:
        return torch.full((like.shape[0], rows, keys), self.fill, dtype=like.dtype)

    def append(self, row: torch.Tensor) -> None:
        """Add ``row`` (lead, 1, S); the oldest row drops when there are ``max_rows``."""
        keys = row.shape[-1]  # S
        if self.end == self.buf.shape[1] or keys > self.buf.shape[2]:
            self._regrow(row, keys)
        self.buf[:, self.end, :keys] = row[:, 0]
        self.end += 1
        self.start = max(self.start, self.end - self.max_rows)
        self.keys = max(self.keys, keys)

    def _regrow(self, row: torch.Tensor, wanted: int) -> None:
        keep = min(self.end - self.start, self.max_rows - 1)  # the newest rows stay
        rows = min(keep + 1 + keep // 4 + 16, self.capacity)  # 1.25x room, as the keys
        keys = self.buf.shape[2] if wanted <= self.buf.shape[2] else wanted + wanted // 4 + 16
        new = self._alloc(row, rows, keys)
        new[:, :keep, : self.buf.shape[2]] = self.buf[:, self.end - keep : self.end]
        self.buf, self.start, self.end = new, 0, keep

    def view(self) -> torch.Tensor:
        return self.buf[:, self.start : self.end, : self.keys]  # (lead, R, S_max)


@dataclass
class _Rows:
    """One slot's rows of the current sequence."""

    heads: tuple[int, ...]
    grid: _Grid | None = None  # attention, qk_logits, head_stats
    norms: torch.Tensor | None = None  # qkv_norms (3, h, R)
    last_keys: int = 0  # S of the last row
    first: int = 0  # sequence position of the first row shown
    row_keys: list[int] = field(default_factory=list)  # S of each row shown
    tokens: list[str | None] = field(default_factory=list)  # one per position since ``first0``
    first0: int = 0  # sequence position of tokens[0]


class RowStore:
    """The growing matrices of a run's recurrent slots.

    Per publish (training thread): :meth:`begin` with the step and the run's sequence
    counter (a new sequence when either goes back / changes), :meth:`new_sequence_in`
    on the captures (a self-attention whose keys stopped growing), then :meth:`add`
    for each. :meth:`keep` and :meth:`reset` may come from the event loop (a new
    plan) at the same time: the slots dict is only touched by single dict operations.
    """

    def __init__(self, max_rows: int = MAX_ROWS) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        self.max_rows = max_rows
        self._slots: dict[SlotKey, _Rows] = {}
        self._step: int | None = None
        self._sequence: int | None = None

    def reset(self) -> None:
        """Forget every slot's rows: the next row of each starts a new matrix."""
        self._slots.clear()

    def keep(self, keys: set[SlotKey]) -> None:
        """Forget the slots not in ``keys`` (a plan that no longer asks for them)."""
        for key in list(self._slots):  # one C-level copy: safe beside the training thread
            if key not in keys:
                self._slots.pop(key, None)

    def begin(self, step: int, sequence: int) -> None:
        """Start a publish at ``step``; a new sequence if the step went back or the run's
        ``sequence`` counter changed."""
        if (self._step is not None and step < self._step) or sequence != self._sequence:
            self.reset()
        self._step, self._sequence = step, sequence

    def new_sequence_in(self, captures: dict[SlotKey, Capture]) -> bool:
        """Whether these captures start a new sequence: a self-attention row with no more
        keys than the last, or a cross-attention row over a memory of another length."""
        for key, cap in captures.items():
            rows = self._slots.get(key)
            if rows is None or rows.grid is None:
                continue
            keys = cap.data.shape[-1]  # S
            if (keys <= rows.last_keys) if cap.role == "self" else (keys != rows.last_keys):
                return True
        return False

    def add(self, key: SlotKey, cap: Capture, token: str | None) -> Capture | None:
        """``cap`` (one row) made the slot's matrix so far: data, labels (and, for
        head_stats, the masks of every row) replaced. ``token`` labels the row.

        None for head_stats while every row has one key (a sequence's first token):
        such a row says nothing of the head, but would read as a collapsed one."""
        rows = self._slots.get(key)
        if rows is None or rows.heads != cap.heads or self._gap(rows, cap):
            rows = self._slots[key] = self._start(cap)
        rows.tokens.append(token)
        if cap.kind == "qkv_norms":
            rows.norms = cap.data if rows.norms is None else \
                torch.cat([rows.norms[..., -(self.max_rows - 1):], cap.data], dim=-1)
            R = rows.norms.shape[-1]
            cap.data = rows.norms  # (3, h, R)
        else:
            check_row(cap)
            if rows.grid is None:
                rows.grid = _Grid(cap.data, _FILL[cap.kind], self.max_rows)
            rows.grid.append(cap.data)
            rows.last_keys = cap.data.shape[-1]
            rows.row_keys = (rows.row_keys + [rows.last_keys])[-self.max_rows:]
            cap.data = rows.grid.view()  # (h, R, S_max)
            R = cap.data.shape[1]
            if cap.kind == "head_stats":
                if max(rows.row_keys) < 2:
                    return None
                cap.masks = self._masks(rows, cap)
        position = rows.first0 + len(rows.tokens) - 1  # this row's position in the sequence
        rows.first = position - R + 1
        cap.labels = self._labels(rows, cap)
        return cap

    def _start(self, cap: Capture) -> _Rows:
        """Empty rows for a slot; a self-attention row over S keys is position S - 1 (a
        watcher who joined mid-sequence), any other starts at 0."""
        first = cap.data.shape[-1] - 1 if cap.role == "self" and cap.kind != "qkv_norms" else 0
        return _Rows(heads=cap.heads, first0=first)

    @staticmethod
    def _gap(rows: _Rows, cap: Capture) -> bool:
        """A self-attention row that skipped keys (rows were missed): start over from it."""
        return (cap.kind != "qkv_norms" and cap.role == "self" and rows.grid is not None
                and cap.data.shape[-1] != rows.last_keys + 1)

    @staticmethod
    def _masks(rows: _Rows, cap: Capture) -> MaskInfo:
        """Which keys each row saw: the row's own S (and the memory's padding)."""
        R, S = cap.data.shape[-2:]
        seen = torch.tensor(rows.row_keys[-R:])[:, None]  # (R, 1)
        valid = torch.arange(S)[None] < seen  # (R, S)
        old = cap.masks
        return MaskInfo(FullMask(valid), None if old is None else old.key_lengths,
                        "full" if old is None else old.attention_type)

    @staticmethod
    def _labels(rows: _Rows, cap: Capture) -> tuple[list[str] | None, list[str] | None] | None:
        """(row labels, key labels): the tokens of the rows and, for self-attention, of the
        keys. Without tokens, the rows' positions once they no longer start at 0."""
        if cap.kind == "head_stats":
            return None
        R = cap.data.shape[-1] if cap.kind == "qkv_norms" else cap.data.shape[-2]
        S = R if cap.kind == "qkv_norms" else cap.data.shape[-1]
        tokens = rows.tokens[-R:]
        if any(t is None for t in tokens):
            queries = None if rows.first == 0 else [str(rows.first + i) for i in range(R)]
            return None if queries is None else (queries, None)
        keys = None
        if cap.role == "self" and rows.first0 == 0 and len(rows.tokens) == S:
            keys = rows.tokens[:]
        return (tokens, keys)


def check_row(cap: Capture) -> None:
    """ValueError unless ``cap`` holds one query row (h, 1, S)."""
    if cap.data.ndim != 3 or cap.data.shape[1] != 1:
        raise ValueError(f"cap: a recurrent site's {cap.kind} must be one query row (h, 1, S), "
                         f"got shape {tuple(cap.data.shape)}")
