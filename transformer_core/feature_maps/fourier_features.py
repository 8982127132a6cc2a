"""Random feature maps: phi(x) . phi(y) is an unbiased estimate of a kernel k(x, y).

* :class:`RandomFourierFeatures`: the Gaussian kernel exp(-t |x - y|^2 / 2)
  (Rahimi and Recht, 2007);
* :class:`SmoothedRandomFourierFeatures`: the same plus a constant, so that
  the estimate stays positive more often;
* :class:`Favor`: positive random features for the softmax kernel exp(t x . y)
  (FAVOR+, Choromanski et al., "Rethinking Attention with Performers", 2020);
* :class:`GeneralizedRandomFeatures`: f(x . w_i) for a given f (same paper).

Every map holds its random matrix ``omega`` (E, m) as a buffer (so it is
saved with the model) and draws a new one when :meth:`new_feature_map` is
called, every ``redraw`` calls; with ``deterministic_eval`` it keeps the
matrix it has while the module is in eval mode.

>>> f = Favor(8, n_dims=4096, softmax_temp=1.0)
>>> x, y = 0.3 * torch.randn(8), 0.3 * torch.randn(8)
>>> estimate = f(x) @ f(y)
>>> bool(abs(estimate - torch.exp(x @ y)) < 0.1)
True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch

from .base import FeatureMap


def orthogonal_gaussian(rows: int, columns: int, device=None, dtype=None) -> torch.Tensor:
    """A (rows, columns) matrix whose columns are orthogonal within each block of
    ``rows`` columns and whose norms are those of N(0, I_rows) vectors: each column
    is marginally Gaussian, but the estimates it gives vary less (Yu et al., 2016).

    >>> w = orthogonal_gaussian(4, 4)
    >>> bool(((w.T @ w) * (1 - torch.eye(4))).abs().max() < 1e-5)
    True
    """
    blocks = []
    for start in range(0, columns, rows):
        width = min(rows, columns - start)
        q, _ = torch.linalg.qr(torch.randn(rows, rows, device=device))  # (rows, rows)
        norms = torch.randn(rows, width, device=device).norm(dim=0)  # (width,) chi(rows)
        blocks.append(q[:, :width] * norms)
    return torch.cat(blocks, dim=1).to(dtype or torch.get_default_dtype())


def _positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class RandomFourierFeatures(FeatureMap):
    """phi(x) = sqrt(1/m) [cos(x' W), sin(x' W)] with x' = sqrt(t) x and W (E, m) Gaussian.

    phi(x) . phi(y) estimates the Gaussian kernel exp(-t |x - y|^2 / 2).

    Arguments
    ---------
    query_dimensions: E.
    n_dims: the number of features, 2m (default E).
    softmax_temp: t (default 1/sqrt(E), the scale softmax attention uses).
    orthogonal: draw W with orthogonal columns (lower variance; default False).
    redraw: draw a new W every ``redraw`` calls of :meth:`new_feature_map` (default 1).
    deterministic_eval: keep W while the module is in eval mode (default False).
    """

    def __init__(self, query_dimensions: int, n_dims: int | None = None,
                 softmax_temp: float | None = None, orthogonal: bool = False,
                 redraw: int = 1, deterministic_eval: bool = False) -> None:
        super().__init__(_positive_int(query_dimensions, "query_dimensions"))
        self.query_dimensions = query_dimensions
        self.n_dims = n_dims if n_dims is not None else query_dimensions
        self.softmax_temp = (
            1.0 / math.sqrt(query_dimensions) if softmax_temp is None else softmax_temp
        )
        self.orthogonal = orthogonal
        self.redraw = _positive_int(redraw, "redraw")
        self.deterministic_eval = deterministic_eval
        _positive_int(self.n_dims, "n_dims")
        self._columns = self._n_columns(self.n_dims)
        if self._columns < 1:
            raise ValueError(f"n_dims={self.n_dims} is too small for {type(self).__name__}")
        # Drawn now, so a map that is used before any redraw is still random.
        self.register_buffer("omega", self._draw(None, None))  # (E, m)
        self._calls = -1

    def _n_columns(self, n_dims: int) -> int:
        """m, the number of random directions behind ``n_dims`` features."""
        return n_dims // 2

    def _draw(self, device, dtype) -> torch.Tensor:
        if self.orthogonal:
            return orthogonal_gaussian(self.query_dimensions, self._columns, device, dtype)
        return torch.randn(self.query_dimensions, self._columns, device=device, dtype=dtype)

    def new_feature_map(self, device: torch.device | str) -> None:
        """Draw a new W on ``device`` when this call is due (see ``redraw``)."""
        if self.deterministic_eval and not self.training:
            return
        self._calls += 1
        if self._calls % self.redraw != 0:
            return
        self.omega = self._draw(device, self.omega.dtype)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., E) -> x' W (..., m)."""
        return (x * math.sqrt(self.softmax_temp)) @ self.omega

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., E) -> (..., 2m)."""
        u = self._project(x)  # (..., m)
        return torch.cat([torch.cos(u), torch.sin(u)], dim=-1) / math.sqrt(self._columns)


class SmoothedRandomFourierFeatures(RandomFourierFeatures):
    """Random Fourier features plus a constant feature sqrt(s).

    phi(x) . phi(y) estimates exp(-t |x - y|^2 / 2) + s: the estimate of a
    kernel near zero is less often negative. ``n_dims`` counts the constant
    feature (default E); ``smoothing`` is s (default 1). Other arguments as in
    :class:`RandomFourierFeatures`.
    """

    def __init__(self, query_dimensions: int, n_dims: int | None = None,
                 softmax_temp: float | None = None, orthogonal: bool = False,
                 smoothing: float = 1.0, redraw: int = 1,
                 deterministic_eval: bool = False) -> None:
        if smoothing < 0:
            raise ValueError(f"smoothing must be >= 0, got {smoothing!r}")
        super().__init__(query_dimensions, n_dims, softmax_temp, orthogonal, redraw,
                         deterministic_eval)
        self.smoothing = smoothing

    def _n_columns(self, n_dims: int) -> int:
        return (n_dims - 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., E) -> (..., 2m + 1)."""
        phi = super().forward(x)  # (..., 2m)
        constant = phi.new_full((*phi.shape[:-1], 1), math.sqrt(self.smoothing))
        return torch.cat([phi, constant], dim=-1)


class Favor(RandomFourierFeatures):
    """Positive random features for softmax: phi(x) . phi(y) estimates exp(t x . y).

    phi(x) = exp(-|x'|^2 / 2) / sqrt(2m) [exp(x' W), exp(-x' W)] with x' = sqrt(t) x,
    the symmetric estimator of Lemma 1 in "Rethinking Attention with Performers".
    Every feature is positive, so implied attention weights are never negative.

    Arguments as in :class:`RandomFourierFeatures`, except ``orthogonal``
    (default True) and ``stabilize`` (default False): divide each query's features
    by their largest, and the keys' features of every (sample, head) by their
    largest over the sequence, dimension 1 of (N, L, H, E) keys. Linear attention's
    normalisation cancels these factors, and no exp overflows. For keys it needs
    whole sequences: do not use it for recurrent (step by step) self-attention.
    """

    def __init__(self, query_dimensions: int, n_dims: int | None = None,
                 softmax_temp: float | None = None, orthogonal: bool = True,
                 stabilize: bool = False, redraw: int = 1,
                 deterministic_eval: bool = False) -> None:
        super().__init__(query_dimensions, n_dims, softmax_temp, orthogonal, redraw,
                         deterministic_eval)
        self.stabilize = stabilize

    def _exponents(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., E) -> the log of the features (..., 2m)."""
        x = x * math.sqrt(self.softmax_temp)
        u = x @ self.omega  # (..., m)
        half_norm = 0.5 * (x * x).sum(-1, keepdim=True)  # (..., 1)
        return torch.cat([u, -u], dim=-1) - half_norm - 0.5 * math.log(2 * self._columns)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., E) -> (..., 2m); with ``stabilize``, x is (N, L, H, E)."""
        exponents = self._exponents(x)
        if self.stabilize:
            exponents = exponents - self._sequence_max(exponents)
        return torch.exp(exponents)

    def forward_queries(self, x: torch.Tensor) -> torch.Tensor:
        """Queries (..., E) -> (..., 2m); with ``stabilize`` each query's features are
        divided by their largest (a factor its normalisation cancels), for any shape."""
        exponents = self._exponents(x)
        if self.stabilize:
            exponents = exponents - exponents.detach().amax(dim=-1, keepdim=True)
        return torch.exp(exponents)

    @staticmethod
    def _sequence_max(exponents: torch.Tensor) -> torch.Tensor:
        """The largest exponent per (sample, head) of (N, L, H, 2m): (N, 1, H, 1), detached."""
        if exponents.ndim != 4 or exponents.shape[1] < exponents.shape[2]:
            warnings.warn(
                f"Favor(stabilize=True) expects keys (N, L, H, E) with L >= H, got shape "
                f"{tuple(exponents.shape[:-1])} (+ features): the factor it removes may "
                "differ between keys of one sequence, which changes the attention",
                stacklevel=3)
        largest = exponents.detach().amax(dim=-1, keepdim=True)  # (..., 1)
        return largest if largest.ndim < 3 else largest.amax(dim=1, keepdim=True)


class GeneralizedRandomFeatures(RandomFourierFeatures):
    """phi(x) = f(x' W) with x' = sqrt(t) x, W (E, n_dims) and f = ``kernel_fn``.

    Arguments as in :class:`RandomFourierFeatures`, except ``n_dims`` is the
    number of random directions (and features, default E), ``softmax_temp``
    defaults to 1, ``orthogonal`` to True, and ``kernel_fn`` (default relu).
    """

    def __init__(self, query_dimensions: int, n_dims: int | None = None,
                 softmax_temp: float = 1.0, orthogonal: bool = True,
                 kernel_fn: Callable[[torch.Tensor], torch.Tensor] = torch.relu,
                 redraw: int = 1, deterministic_eval: bool = False) -> None:
        super().__init__(query_dimensions, n_dims, softmax_temp, orthogonal, redraw,
                         deterministic_eval)
        self.kernel_fn = kernel_fn

    def _n_columns(self, n_dims: int) -> int:
        return n_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., E) -> (..., n_dims)."""
        return self.kernel_fn(self._project(x))
