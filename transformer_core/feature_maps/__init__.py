"""Feature maps for linear attentions: phi(q) . phi(k) stands for the attention kernel.

A builder's ``feature_map`` argument is a factory ``E -> FeatureMap``: pass
``elu_feature_map`` or e.g. ``Favor.factory(n_dims=256)``.
"""

from .base import ActivationFunctionFeatureMap, FeatureMap, elu_feature_map
from .fourier_features import (
    Favor,
    GeneralizedRandomFeatures,
    RandomFourierFeatures,
    SmoothedRandomFourierFeatures,
    orthogonal_gaussian,
)

__all__ = [
    "ActivationFunctionFeatureMap",
    "Favor",
    "FeatureMap",
    "GeneralizedRandomFeatures",
    "RandomFourierFeatures",
    "SmoothedRandomFourierFeatures",
    "elu_feature_map",
    "orthogonal_gaussian",
]
