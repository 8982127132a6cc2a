"""The feature-map interface and the deterministic maps.

A builder's ``feature_map`` argument is a *factory*: a callable taking the
query dimension E and returning a :class:`FeatureMap` module.

>>> phi = elu_feature_map(4)
>>> phi(torch.tensor([[-1.0, 0.0, 2.0]])).tolist()
[[0.3678794503211975, 1.0, 3.0]]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class FeatureMap(nn.Module):
    """Maps queries and keys (..., E) to features (..., E') whose dot products
    stand for the attention kernel: k(q, k) ~ phi(q) . phi(k).

    Linear attentions call :meth:`new_feature_map` once per batch (recurrent
    attentions once per sequence), then :meth:`forward_queries` and
    :meth:`forward_keys`. A symmetric map only defines ``forward``.
    """

    def __init__(self, query_dims: int) -> None:
        super().__init__()
        self.query_dims = query_dims

    def new_feature_map(self, device: torch.device | str) -> None:
        """Resample random features, if any, on ``device`` (deterministic maps: nothing)."""

    def forward_queries(self, x: torch.Tensor) -> torch.Tensor:
        """Features of queries (..., E) -> (..., E')."""
        return self(x)

    def forward_keys(self, x: torch.Tensor) -> torch.Tensor:
        """Features of keys (..., E) -> (..., E')."""
        return self(x)

    @classmethod
    def factory(cls, *args, **kwargs) -> Callable[[int], FeatureMap]:
        """A callable ``query_dims -> cls(query_dims, *args, **kwargs)``.

        Each attention calls it once, so every layer gets its own random features.
        """

        def make(query_dims: int) -> FeatureMap:
            return cls(query_dims, *args, **kwargs)

        return make


class ActivationFunctionFeatureMap(FeatureMap):
    """phi(x) = activation(x), applied elementwise."""

    def __init__(self, query_dims: int, activation_function: Callable) -> None:
        super().__init__(query_dims)
        self.activation_function = activation_function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., E) -> (..., E)."""
        return self.activation_function(x)


def _elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1


# phi(x) = elu(x) + 1 (Katharopoulos et al., 2020): positive, so every implied
# attention weight is positive and rows normalise.
elu_feature_map = ActivationFunctionFeatureMap.factory(_elu_plus_one)

__all__ = ["ActivationFunctionFeatureMap", "FeatureMap", "elu_feature_map"]
