"""Masks, as in fast-transformers: boolean matrices with cached views.

``True`` means "may attend". An attention mask is (L, S); a length mask is
(N, max_len) built from per-sample lengths. Attentions ask a mask what they
need (``bool_matrix``, ``additive_matrix``, ``all_ones``, ``lower_triangular``)
so that e.g. an all-ones mask costs nothing and a causal one maps to
``is_causal=True`` on the fused kernel.
"""

from __future__ import annotations

import torch


class BaseMask:
    """Common views of a boolean mask; subclasses provide ``bool_matrix``."""

    @property
    def bool_matrix(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.bool_matrix.shape)

    @property
    def float_matrix(self) -> torch.Tensor:
        """1.0 where allowed, 0.0 where masked."""
        if not hasattr(self, "_float_matrix"):
            self._float_matrix = self.bool_matrix.float()
        return self._float_matrix

    @property
    def additive_matrix(self) -> torch.Tensor:
        """0 where allowed, -inf where masked (to add to logits)."""
        if not hasattr(self, "_additive_matrix"):
            self._additive_matrix = torch.zeros_like(self.float_matrix).masked_fill(
                ~self.bool_matrix, float("-inf")
            )
        return self._additive_matrix

    @property
    def all_ones(self) -> bool:
        """True when nothing is masked (cached)."""
        if not hasattr(self, "_all_ones"):
            self._all_ones = bool(self.bool_matrix.all())
        return self._all_ones

    @property
    def lower_triangular(self) -> bool:
        """True when row ``i`` allows exactly the columns ``j <= i`` (the causal pattern;
        an (N, M) mask with M > N may have all-masked columns past N)."""
        if not hasattr(self, "_lower_triangular"):
            m = self.bool_matrix
            self._lower_triangular = (
                m.ndim == 2
                and m.shape[1] >= m.shape[0]
                and bool(torch.equal(m, torch.ones_like(m).tril()))
            )
        return self._lower_triangular


class FullMask(BaseMask):
    """An explicit (N, M) boolean mask, or all ones of that size.

    ``FullMask(mask)`` wraps a bool tensor; ``FullMask(N)`` or ``FullMask(N, M)``
    is all ones (nothing masked).

    >>> FullMask(3).all_ones, FullMask(torch.ones(2, 3).tril().bool()).all_ones
    (True, False)
    """

    def __init__(self, mask=None, N=None, M=None, device="cpu"):
        if mask is not None and isinstance(mask, torch.Tensor):
            if mask.dtype != torch.bool:
                raise ValueError(f"FullMask: mask must be a bool tensor, got dtype {mask.dtype}")
            if mask.ndim != 2:
                raise ValueError(
                    f"FullMask: mask must be 2-D (L, S), got shape {tuple(mask.shape)}"
                )
            self._mask = mask
            return
        if mask is not None:  # FullMask(N[, M]) positional form, as in fast-transformers
            N, M = mask, N
        if N is None:
            raise ValueError("FullMask: give either a bool mask tensor or its size N (and M)")
        # All ones: known without building the matrix, which is made only if asked for.
        self._mask = None
        self._size = (int(N), int(N if M is None else M))
        self._device = device
        self._all_ones = True

    @property
    def bool_matrix(self) -> torch.Tensor:
        if self._mask is None:
            self._mask = torch.ones(*self._size, dtype=torch.bool, device=self._device)
        return self._mask

    @property
    def shape(self) -> tuple[int, ...]:
        return self._size if self._mask is None else tuple(self._mask.shape)

    @property
    def lengths(self) -> torch.Tensor:
        """(N,) int64: how many leading positions each row allows; ValueError when a
        row is not a prefix (e.g. ``[1, 0, 1]``).

        >>> FullMask(torch.tensor([[1, 0], [1, 1]]) > 0).lengths.tolist()
        [1, 2]
        """
        if not hasattr(self, "_lengths"):
            m = self.bool_matrix
            lengths = m.sum(-1)
            prefix = torch.arange(m.shape[-1], device=m.device) < lengths[..., None]
            if not torch.equal(m, prefix):
                raise ValueError("lengths: every row of the mask must allow a prefix of "
                                 "positions (1...1 0...0) to be read as lengths")
            self._lengths = lengths
        return self._lengths


class LengthMask(BaseMask):
    """Per-sample lengths as an (N, max_len) mask: position ``j < lengths[n]`` is allowed.

    >>> LengthMask(torch.tensor([2, 3])).bool_matrix.int().tolist()
    [[1, 1, 0], [1, 1, 1]]
    """

    def __init__(self, lengths: torch.Tensor, max_len: int | None = None, device=None):
        lengths = torch.as_tensor(lengths, device=device)
        if lengths.ndim != 1:
            raise ValueError(
                f"LengthMask: lengths must be 1-D (N,), got shape {tuple(lengths.shape)}"
            )
        self.lengths = lengths.long()
        self.max_len = int(max_len if max_len is not None else self.lengths.max())
        if bool((self.lengths > self.max_len).any()) or bool((self.lengths < 0).any()):
            raise ValueError(
                f"LengthMask: every length must be in [0, max_len={self.max_len}], "
                f"got {self.lengths.tolist()}"
            )
        self._all_ones = bool((self.lengths == self.max_len).all())

    @classmethod
    def full(cls, N: int, max_len: int, device=None) -> LengthMask:
        """Every sample has length ``max_len``; known all-ones without a device sync."""
        mask = cls.__new__(cls)
        mask.lengths = torch.full((N,), max_len, dtype=torch.long, device=device)
        mask.max_len = int(max_len)
        mask._all_ones = True
        return mask

    @property
    def bool_matrix(self) -> torch.Tensor:
        if not hasattr(self, "_bool_matrix"):
            positions = torch.arange(self.max_len, device=self.lengths.device)
            self._bool_matrix = positions[None, :] < self.lengths[:, None]
        return self._bool_matrix


def sample_rows(mask: BaseMask | None, n: int) -> BaseMask | None:
    """Row ``n`` of a per-sample (N, S) mask, such as key lengths, as a mask of one sample
    that owns a copy of what it needs (no device sync). None stays None.

    >>> sample_rows(LengthMask(torch.tensor([2, 3])), 0).bool_matrix.int().tolist()
    [[1, 1, 0]]
    """
    if mask is None:
        return None
    if isinstance(mask, LengthMask) and not isinstance(mask, TriangularCausalMask):
        row = LengthMask.__new__(LengthMask)
        row.lengths = mask.lengths[n : n + 1].clone()  # (1,)
        row.max_len = mask.max_len
        if getattr(mask, "_all_ones", False):
            row._all_ones = True
        return row
    return FullMask(mask.bool_matrix[n : n + 1].clone())  # (1, S)


def concat_rows(masks: list[BaseMask | None], max_len: int) -> BaseMask | None:
    """Per-sample masks (such as :func:`sample_rows`'s) stacked as one (sum N, max_len)
    mask; None when none masks anything.

    >>> rows = [sample_rows(LengthMask(torch.tensor([2, 3])), i) for i in (1, 0)]
    >>> concat_rows(rows + [None], 3).bool_matrix.int().tolist()
    [[1, 1, 1], [1, 1, 0], [1, 1, 1]]
    """
    if all(m is None or m.all_ones for m in masks):
        return None
    rows = [torch.ones(1, max_len, dtype=torch.bool) if m is None else m.bool_matrix[:, :max_len]
            for m in masks]
    device = next(r.device for r, m in zip(rows, masks, strict=True) if m is not None)
    return FullMask(torch.cat([r.to(device) for r in rows]))


class TriangularCausalMask(LengthMask):
    """The (N, N) causal mask: query ``i`` may attend to keys ``j <= i``.

    >>> TriangularCausalMask(3).lower_triangular
    True
    """

    def __init__(self, N: int, device="cpu"):
        super().__init__(torch.arange(1, N + 1, device=device), N, device=device)
        self._lower_triangular = True
        self._all_ones = N <= 1

    @property
    def bool_matrix(self) -> torch.Tensor:
        if not hasattr(self, "_bool_matrix"):
            self._bool_matrix = torch.ones(
                self.max_len, self.max_len, dtype=torch.bool, device=self.lengths.device
            ).tril()
        return self._bool_matrix


__all__ = ["BaseMask", "FullMask", "LengthMask", "TriangularCausalMask"]
