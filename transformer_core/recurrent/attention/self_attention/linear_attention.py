"""Causal linear self-attention one step at a time, with a state of fixed size."""

from __future__ import annotations

import torch
import torch.nn as nn

from ....attention_registry import (
    Callable,
    EventDispatcherInstance,
    Float,
    Int,
    Optional,
    RecurrentAttentionRegistry,
)
from ....events import EventDispatcher
from ....feature_maps import elu_feature_map
from ..._utils import check_state
from .._events import linear_step_event
from .full_attention import check_batch


class RecurrentLinearState(list):
    """``[kv (N, H, E', D), z (N, H, E')]``: sum_j phi(k_j) v_j^T and sum_j phi(k_j).

    A list, as fast-transformers' state is, plus what events need: ``steps``,
    the number of keys folded in, and ``recorded``, the feature-mapped keys
    (N, H, E') of the last ``len(recorded)`` steps. Keys are recorded only at
    steps where someone listens, so inference without listeners keeps O(1) memory.
    """

    def __init__(self, kv: torch.Tensor, z: torch.Tensor, steps: int,
                 recorded: tuple[torch.Tensor, ...] = ()) -> None:
        super().__init__([kv, z])
        self.steps = steps
        self.recorded = recorded


class RecurrentLinearAttention(nn.Module):
    """Causal linear attention as a recurrence: the dual of ``CausalLinearAttention``.

    out_i = phi(q_i) . sum_{j<=i} phi(k_j) v_j^T / (phi(q_i) . sum_{j<=i} phi(k_j) + eps);
    the two sums are the state, so every step costs the same whatever the length.

    Arguments
    ---------
    query_dimensions: E, to build the feature map.
    feature_map: a factory ``E -> FeatureMap`` (default elu(x) + 1); random maps
        draw new features at the first step of every sequence.
    eps: added to the normaliser (1e-6, as the batch attention).
    event_dispatcher: key or instance; a listener gets one :class:`AttentionEvent`
        per step, the implied row (N, H, 1, S) phi(q) . phi(k_j) / normaliser.
        Keys folded into the state before anyone listened show as 0 in that row
        (their features were not kept), so it then sums to less than 1; so does
        a row after a state that was not made here (a plain list).

    >>> att = RecurrentLinearAttention(8).eval()
    >>> state = None
    >>> for _ in range(3):
    ...     out, state = att(torch.rand(2, 4, 8), torch.rand(2, 4, 8), torch.rand(2, 4, 6), state)
    >>> tuple(out.shape), tuple(state[0].shape), tuple(state[1].shape), state.steps
    ((2, 4, 6), (2, 4, 8, 6), (2, 4, 8), 3)
    """

    attention_type = "linear"

    def __init__(self, query_dimensions, feature_map=None, eps=1e-6, event_dispatcher=""):
        super().__init__()
        self.feature_map = (feature_map or elu_feature_map)(query_dimensions)
        self.eps = eps
        self.role = "self"
        self.event_dispatcher = EventDispatcher.get(event_dispatcher)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                state=None, memory=None) -> tuple[torch.Tensor, RecurrentLinearState]:
        """query, key (N, H, E), value (N, H, D), state (or ``memory``, deprecated)
        -> (output (N, H, D), [kv (N, H, E', D), z (N, H, E')])."""
        state = check_state(state, memory)
        if state is None:
            self.feature_map.new_feature_map(query.device)
        phi_q = self.feature_map.forward_queries(query)  # (N, H, E')
        phi_k = self.feature_map.forward_keys(key)  # (N, H, E')
        kv = torch.einsum("nhe,nhd->nhed", phi_k, value)  # (N, H, E', D)
        z = phi_k
        steps, recorded = 0, ()
        if state is not None:
            check_batch(state[0], query.shape[0])
            # Out of place: an event dispatched at an earlier step still reads its own z.
            kv, z = state[0] + kv, state[1] + z
            if isinstance(state, RecurrentLinearState):
                steps, recorded = state.steps, state.recorded
        normaliser = torch.einsum("nhe,nhe->nh", phi_q, z) + self.eps  # (N, H)
        out = torch.einsum("nhe,nhed->nhd", phi_q, kv) / normaliser[..., None]  # (N, H, D)
        listening = self.event_dispatcher.has_listeners
        # Recorded keys must be the last ones: a step without a listener drops them.
        recorded = recorded + (phi_k,) if listening else ()
        if listening:
            self.event_dispatcher.dispatch(linear_step_event(
                self, phi_q, recorded, normaliser, steps + 1 - len(recorded), None, self.role))
        return out, RecurrentLinearState(kv, z, steps + 1, recorded)


_PARAMETERS = [
    ("query_dimensions", Int),
    ("feature_map", Optional(Callable)),
    ("eps", Optional(Float, 1e-6)),
    ("event_dispatcher", Optional(EventDispatcherInstance, "")),
]
RecurrentAttentionRegistry.register("linear", RecurrentLinearAttention, _PARAMETERS)
RecurrentAttentionRegistry.register("causal-linear", RecurrentLinearAttention, _PARAMETERS)
