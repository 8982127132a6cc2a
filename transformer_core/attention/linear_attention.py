"""Linear attention (Katharopoulos et al., 2020) and the matrix it implies."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..attention_registry import (
    AttentionRegistry,
    Callable,
    EventDispatcherInstance,
    Int,
    Optional,
)
from ..events import AttentionEvent, EventDispatcher
from ..events.portable import Recipe
from ..feature_maps import elu_feature_map
from ..masking import BaseMask, sample_rows
from ._masks import UnsupportedMaskError, select


def kernel_matrix(phi_q, phi_k, eps, samples, heads, causal=False):
    """The implied attention (n, h, L, S): phi(q).phi(k) normalised over keys.

    ``phi_k`` already has masked keys zeroed. Rows sum to 1 (up to ``eps``, the
    same stabiliser the output computation uses).
    """
    q = select(phi_q, samples, heads)  # (n, L, h, E')
    k = select(phi_k, samples, heads)  # (n, S, h, E')
    scores = torch.einsum("nlhe,nshe->nhls", q, k)  # (n, h, L, S)
    if causal:
        scores = scores.tril()
    return scores / (scores.sum(-1, keepdim=True) + eps)


def kernel_logits(phi_q, phi_k, samples, heads, causal=False):
    """log(phi(q).phi(k)) (n, h, L, S); masked and (if causal) future keys are -inf."""
    q = select(phi_q, samples, heads)
    k = select(phi_k, samples, heads)
    logits = torch.einsum("nlhe,nshe->nhls", q, k).log()  # (n, h, L, S)
    if causal:
        L, S = logits.shape[-2:]
        future = torch.ones(L, S, dtype=torch.bool, device=logits.device).triu(1)
        logits = logits.masked_fill(future, float("-inf"))
    return logits


def kernel_event(source, phi_q, phi_k, key_lengths, shape, causal, eps, *,
                 role: str = "self", attention_type: str = "linear") -> AttentionEvent:
    """The lazy :class:`AttentionEvent` ``shape`` (N, H, L, S) implied by feature-mapped
    queries (N, L, H, E') and keys (N, S, H, E') (masked keys already zeroed)."""

    def copy(n: int) -> AttentionEvent:
        q = phi_q[n : n + 1].detach().clone()  # (1, L, H, E')
        k = phi_k[n : n + 1].detach().clone()  # (1, S, H, E')
        return kernel_event(source, q, k, sample_rows(key_lengths, n), (1, *shape[1:]),
                            causal, eps, role=role, attention_type=attention_type)

    return AttentionEvent(
        source,
        shape,
        lambda n, h: kernel_logits(phi_q, phi_k, n, h, causal),
        lambda n, h: kernel_matrix(phi_q, phi_k, eps, n, h, causal),
        key_lengths=key_lengths,
        role=role,
        attention_type=attention_type,
        copy_fn=copy,
        recipe=Recipe("kernel", {"shape": list(shape), "causal": bool(causal), "eps": float(eps)},
                      {"phi_q": phi_q, "phi_k": phi_k}, {"key_lengths": key_lengths}),
    )


def _exclusive_cumsum(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sums of the entries before each one along ``dim`` (the first gets 0)."""
    before = torch.cumsum(t.narrow(dim, 0, t.shape[dim] - 1), dim)
    return torch.cat([torch.zeros_like(t.narrow(dim, 0, 1)), before], dim)


def _blocks(t: torch.Tensor, P: int, size: int, ones: bool = False) -> torch.Tensor:
    """Rows (N, T, H, X), T <= P * size, cut into chunks: (N H P, size, X), zero rows
    past T; with ``ones`` an extra last column of ones (X + 1). One copy."""
    N, T, H, X = t.shape
    out = t.new_zeros(N, H, P * size, X + ones)
    if ones:
        out[..., X] = 1.0
    out[:, :, :T, :X] = t.transpose(1, 2)
    return out.view(N * H * P, size, X + ones)


def causal_linear(phi_q: torch.Tensor, phi_k: torch.Tensor, values: torch.Tensor, chunk: int,
                  eps: float) -> torch.Tensor:
    """Causal linear attention of feature-mapped queries (N, L, H, E'), keys
    (N, T, H, E') and values (N, T, H, D), T <= L (missing keys count as masked):
    (N, L, H, D), output i = sum_{j<=i} (q_i.k_j) v_j / (sum_{j<=i} q_i.k_j + eps).

    A blocked algorithm with no Python loop: the L positions are cut into P chunks
    of ``chunk``; inside a chunk the causal products are one masked matmul; the past
    of a chunk is the exclusive cumulative sum of the chunks' k^T [v, 1] (P, E', D + 1)
    (the ones column carries the normaliser's sum of keys), so every step (and
    autograd's backward of it) is a batched matmul or one cumsum over P.
    """
    N, L, H, _ = phi_q.shape
    D = values.shape[-1]
    size = max(1, min(chunk, L))
    P = -(-L // size)
    both = _chunk_products(phi_q, phi_k, values, P, size)  # (N H P, size, D + 1)
    out = both[..., :D] / (both[..., D:] + eps)  # (N H P, size, D)
    return out.view(N, H, P * size, D)[:, :, :L].transpose(1, 2).contiguous()


def _chunk_products(phi_q, phi_k, values, P: int, size: int) -> torch.Tensor:
    """The numerators and normalisers (N H P, size, D + 1) of :func:`causal_linear`.

    A function of its own so that its blocked copies and products are freed as soon
    as it returns (they would otherwise stay alive until the output is built).
    """
    N, _, H, _ = phi_q.shape
    D = values.shape[-1]
    q, k = _blocks(phi_q, P, size), _blocks(phi_k, P, size)  # (N H P, size, E')
    v = _blocks(values, P, size, ones=True)  # (N H P, size, D + 1)
    state = torch.bmm(k.transpose(1, 2), v).view(N * H, P, -1, D + 1)  # (N H, P, E', D + 1)
    past = _exclusive_cumsum(state, 1).view(N * H * P, -1, D + 1)
    del state  # (not needed by autograd: cumsum's backward does not use its input)
    local = torch.bmm(q, k.transpose(1, 2)).tril_()  # (N H P, size, size)
    return torch.bmm(local, v).baddbmm_(q, past)


class LinearAttention(nn.Module):
    """phi(Q) (phi(K)^T V) normalised by phi(Q) sum(phi(K)): O(L) time and memory.

    Arguments
    ---------
    query_dimensions: E, used to build the feature map.
    feature_map: a factory ``E -> FeatureMap``; None means elu(x) + 1.
    eps: added to the normaliser so an all-masked row cannot divide by zero.
    event_dispatcher: dispatcher key or instance; listeners get an
        AttentionEvent whose matrix is the one implied by the feature map.

    Arbitrary attention masks cannot be expressed in linear form: only an
    all-ones ``attn_mask`` is accepted; padded keys go through ``key_lengths``.
    """

    attention_type = "linear"

    def __init__(self, query_dimensions, feature_map=None, eps=1e-6, event_dispatcher=""):
        super().__init__()
        self.feature_map = (feature_map or elu_feature_map)(query_dimensions)
        self.eps = eps
        self.role = "self"
        self.event_dispatcher = EventDispatcher.get(event_dispatcher)

    def _features(self, queries, keys, key_lengths):
        self.feature_map.new_feature_map(queries.device)
        phi_q = self.feature_map.forward_queries(queries)  # (N, L, H, E')
        phi_k = self.feature_map.forward_keys(keys)  # (N, S, H, E')
        if key_lengths is not None and not key_lengths.all_ones:
            phi_k = phi_k * key_lengths.float_matrix[:, : keys.shape[1], None, None]
        return phi_q, phi_k

    def _dispatch(self, phi_q, phi_k, key_lengths, shape, causal):
        self.event_dispatcher.dispatch(self._event(phi_q, phi_k, key_lengths, shape, causal))

    def _event(self, phi_q, phi_k, key_lengths, shape, causal) -> AttentionEvent:
        """The lazy event of feature-mapped queries (N, L, H, E') and keys (N, S, H, E')."""
        return kernel_event(self, phi_q, phi_k, key_lengths, shape, causal, self.eps,
                            role=self.role, attention_type=self.attention_type)

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attn_mask: BaseMask | None = None,
        query_lengths: BaseMask | None = None,
        key_lengths: BaseMask | None = None,
    ) -> torch.Tensor:
        """queries (N, L, H, E), keys (N, S, H, E), values (N, S, H, D) -> (N, L, H, D)."""
        if attn_mask is not None and not attn_mask.all_ones:
            raise UnsupportedMaskError(
                "attn_mask: linear attention supports only an all-ones attention mask; "
                "use attention_type='causal-linear' for causal masking or key lengths for padding"
            )
        phi_q, phi_k = self._features(queries, keys, key_lengths)
        kv = torch.einsum("nshe,nshd->nhed", phi_k, values)  # (N, H, E', D)
        z = 1.0 / (torch.einsum("nlhe,nhe->nlh", phi_q, phi_k.sum(1)) + self.eps)  # (N, L, H)
        out = torch.einsum("nlhe,nhed,nlh->nlhd", phi_q, kv, z).contiguous()  # (N, L, H, D)
        if self.event_dispatcher.has_listeners:
            N, L, H, _ = queries.shape
            self._dispatch(phi_q, phi_k, key_lengths, (N, H, L, keys.shape[1]), causal=False)
        return out


class CausalLinearAttention(LinearAttention):
    """Linear attention where query i sees keys j <= i, computed chunk by chunk.

    Within a chunk of ``chunk_size`` positions the (causal) products are
    explicit; across chunks a running sum of phi(k) v^T carries the past (see
    :func:`causal_linear`), so time is O(L (chunk_size + E D)) and memory
    O(L chunk_size + L / chunk_size E D) per head.
    Query i sees keys j <= i: with S > L the keys past L are never seen, with
    S < L the last queries see all keys. ``attn_mask`` must be causal or all ones
    (treated as causal); anything else raises :class:`UnsupportedMaskError`.
    """

    attention_type = "causal-linear"

    def __init__(
        self, query_dimensions, feature_map=None, eps=1e-6, chunk_size=64, event_dispatcher=""
    ):
        super().__init__(query_dimensions, feature_map, eps, event_dispatcher)
        self.chunk_size = chunk_size

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attn_mask: BaseMask | None = None,
        query_lengths: BaseMask | None = None,
        key_lengths: BaseMask | None = None,
    ) -> torch.Tensor:
        """queries (N, L, H, E), keys (N, S, H, E), values (N, S, H, D) -> (N, L, H, D)."""
        N, L, H, _ = queries.shape
        S = keys.shape[1]
        if attn_mask is not None and not (attn_mask.lower_triangular or attn_mask.all_ones):
            raise UnsupportedMaskError(
                "attn_mask: causal-linear attention supports only a causal mask")
        phi_q, phi_k_all = self._features(queries, keys, key_lengths)
        # keys j < L are the only ones any query sees; missing ones count as masked
        out = causal_linear(phi_q, phi_k_all[:, :L], values[:, :L], self.chunk_size, self.eps)
        if self.event_dispatcher.has_listeners:
            self._dispatch(phi_q, phi_k_all, key_lengths, (N, H, L, S), causal=True)
        return out


_LINEAR_PARAMS = [
    ("query_dimensions", Int),
    ("feature_map", Optional(Callable)),
    ("event_dispatcher", Optional(EventDispatcherInstance, "")),
]
AttentionRegistry.register("linear", LinearAttention, _LINEAR_PARAMS)
AttentionRegistry.register("causal-linear", CausalLinearAttention, _LINEAR_PARAMS)
