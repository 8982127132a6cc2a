"""Linear cross-attention one query at a time over a fixed memory."""

from __future__ import annotations

import torch
import torch.nn as nn

from ....attention_registry import (
    Callable,
    EventDispatcherInstance,
    Float,
    Int,
    Optional,
    RecurrentCrossAttentionRegistry,
)
from ....events import EventDispatcher
from ....feature_maps import elu_feature_map
from ....masking import BaseMask
from .._events import linear_step_event


class RecurrentCrossLinearState(list):
    """``[kv (N, H, E', D), z (N, H, E')]`` of the memory, as fast-transformers' state,
    plus ``feature_keys`` (N, S, H, E'): the memory's feature-mapped keys (padded
    ones zeroed), kept so that events can show each memory position's weight.
    They were computed anyway to build kv and z; keeping them costs no compute.
    """

    def __init__(self, kv: torch.Tensor, z: torch.Tensor, feature_keys: torch.Tensor) -> None:
        super().__init__([kv, z])
        self.feature_keys = feature_keys


class RecurrentCrossLinearAttention(nn.Module):
    """Linear attention of one query per call to keys and values given once: the
    dual of ``LinearAttention`` used as cross-attention.

    The first call folds keys (N, S, H, E) and values (N, S, H, D) into the
    state ``[kv, z]`` (sum_j phi(k_j) v_j^T, sum_j phi(k_j)), padded positions
    (``key_lengths``) left out; later calls need only the query (N, H, E).

    Arguments
    ---------
    query_dimensions: E, to build the feature map.
    feature_map: a factory ``E -> FeatureMap`` (default elu(x) + 1); random maps
        draw new features at the first step.
    eps: added to the normaliser (1e-6).
    event_dispatcher: key or instance; a listener gets one :class:`AttentionEvent`
        per step (``role == "cross"``), the implied row (N, H, 1, S). A state that
        was not made here (a plain list) has no keys to show: then no event.

    >>> att = RecurrentCrossLinearAttention(8).eval()
    >>> out, state = att(torch.rand(2, 4, 8), torch.rand(2, 5, 4, 8), torch.rand(2, 5, 4, 6), None)
    >>> out, state = att(torch.rand(2, 4, 8), None, None, None, state=state)
    >>> tuple(out.shape), tuple(state[0].shape), tuple(state.feature_keys.shape)
    ((2, 4, 6), (2, 4, 8, 6), (2, 5, 4, 8))
    """

    attention_type = "linear"

    def __init__(self, query_dimensions, feature_map=None, eps=1e-6, event_dispatcher=""):
        super().__init__()
        self.feature_map = (feature_map or elu_feature_map)(query_dimensions)
        self.eps = eps
        self.role = "cross"
        self.event_dispatcher = EventDispatcher.get(event_dispatcher)

    def _fold(self, keys: torch.Tensor | None, values: torch.Tensor | None,
              key_lengths: BaseMask | None) -> RecurrentCrossLinearState:
        """The state of the memory keys (N, S, H, E) and values (N, S, H, D)."""
        if keys is None or values is None:
            raise ValueError("keys and values are needed at the first step (state is None)")
        phi_k = self.feature_map.forward_keys(keys)  # (N, S, H, E')
        if key_lengths is not None and not key_lengths.all_ones:
            phi_k = phi_k * key_lengths.float_matrix[:, : keys.shape[1], None, None]
        kv = torch.einsum("nshe,nshd->nhed", phi_k, values)  # (N, H, E', D)
        return RecurrentCrossLinearState(kv, phi_k.sum(1), phi_k)

    def forward(self, query: torch.Tensor, keys: torch.Tensor | None,
                values: torch.Tensor | None, key_lengths: BaseMask | None,
                state=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """query (N, H, E), keys (N, S, H, E), values (N, S, H, D) or ``state``
        -> (output (N, H, D), [kv (N, H, E', D), z (N, H, E')])."""
        if state is None:
            self.feature_map.new_feature_map(query.device)
            state = self._fold(keys, values, key_lengths)
        kv, z = state[0], state[1]
        phi_q = self.feature_map.forward_queries(query)  # (N, H, E')
        normaliser = torch.einsum("nhe,nhe->nh", phi_q, z) + self.eps  # (N, H)
        out = torch.einsum("nhe,nhed->nhd", phi_q, kv) / normaliser[..., None]  # (N, H, D)
        if self.event_dispatcher.has_listeners and isinstance(state, RecurrentCrossLinearState):
            self.event_dispatcher.dispatch(linear_step_event(
                self, phi_q, state.feature_keys, normaliser, 0, key_lengths, self.role))
        return out, state


RecurrentCrossAttentionRegistry.register("linear", RecurrentCrossLinearAttention, [
    ("query_dimensions", Int),
    ("feature_map", Optional(Callable)),
    ("eps", Optional(Float, 1e-6)),
    ("event_dispatcher", Optional(EventDispatcherInstance, "")),
])
