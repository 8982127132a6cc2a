"""Feature maps for linear attentions, as in fast-transformers.

A builder's ``feature_map`` argument is a *factory*: a callable taking the
query dimension E and returning a :class:`FeatureMap` module.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class FeatureMap(nn.Module):
    """Maps queries and keys (N, L, H, E) to non-negative features (N, L, H, E')."""

    def __init__(self, query_dims: int) -> None:
        super().__init__()
        self.query_dims = query_dims

    def new_feature_map(self, device) -> None:
        """Resample random features, if any (called before every forward)."""

    def forward_queries(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)

    def forward_keys(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)

    @classmethod
    def factory(cls, *args, **kwargs) -> Callable[[int], FeatureMap]:
        """A callable ``query_dims -> cls(query_dims, *args, **kwargs)``."""

        def make(query_dims: int) -> FeatureMap:
            return cls(query_dims, *args, **kwargs)

        return make


class ActivationFunctionFeatureMap(FeatureMap):
    """phi(x) = activation(x), applied elementwise."""

    def __init__(self, query_dims: int, activation_function: Callable) -> None:
        super().__init__(query_dims)
        self.activation_function = activation_function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation_function(x)


def _elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1


# phi(x) = elu(x) + 1 (Katharopoulos et al., 2020): positive, so every implied
# attention weight is positive and rows normalise.
elu_feature_map = ActivationFunctionFeatureMap.factory(_elu_plus_one)

__all__ = ["ActivationFunctionFeatureMap", "FeatureMap", "elu_feature_map"]
