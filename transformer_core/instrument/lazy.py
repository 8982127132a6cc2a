"""The lazy AttentionEvent of one ``scaled_dot_product_attention``-style call.

Every adapter reduces what it intercepts to the arguments of that call: queries,
keys (possibly fewer key heads: grouped-query attention), a mask, ``is_causal``,
a scale and an optional soft cap. :func:`sdpa_event` keeps them and computes the
attention matrix only when it is read, for the samples and heads asked.

Shape legend: N batch, L queries, S keys, H query heads, K key heads (H % K == 0),
E query/key dimension per head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..events import AttentionEvent, SoftmaxScores
from ..events.portable import Recipe
from ..masking import FullMask


class StaleEventError(RuntimeError):
    """An event was read after the tensors it keeps were changed in place (e.g. a
    static key cache written by the next ``generate`` step)."""


def _version(t: torch.Tensor) -> int | None:
    # Inference-mode tensors keep no version counter: their changes cannot be seen.
    return None if t.is_inference() else t._version


@dataclass(frozen=True)
class SDPACall:
    """The arguments of one attention call, in the event's layout.

    ``queries`` (N, L, H, E); ``keys`` (N, S, K, E); ``mask`` None, bool (True:
    may attend) or float (added to the logits), broadcastable to (N, H, L, S);
    ``is_causal``: the top-left lower-triangular (L, S) pattern, as the fused
    kernel applies it; ``softcap``: logits become ``softcap * tanh(logits / softcap)``
    before the mask (Gemma-style).
    """

    queries: torch.Tensor
    keys: torch.Tensor
    mask: torch.Tensor | None
    is_causal: bool
    scale: float
    softcap: float | None = None
    versions: tuple[int | None, ...] = ()

    @classmethod
    def of(cls, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None = None,
           is_causal: bool = False, scale: float | None = None,
           softcap: float | None = None) -> SDPACall:
        """From the fused kernel's layout: query (N, H, L, E), key (N, K, S, E)."""
        if query.shape[1] % key.shape[1]:
            raise ValueError(
                f"key: {key.shape[1]} key heads do not divide {query.shape[1]} query heads")
        if mask is not None and mask.ndim < 4:
            mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))  # (.., L|1, S)
        scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
        q, k = query.transpose(1, 2), key.transpose(1, 2)  # (N, L, H, E), (N, S, K, E)
        return cls(q, k, mask, bool(is_causal), scale, softcap,
                   (_version(query), _version(key)))

    @property
    def shape(self) -> tuple[int, int, int, int]:
        N, L, H, _ = self.queries.shape
        return (N, H, L, self.keys.shape[1])

    def shared_mask(self) -> FullMask | None:
        """The (L, S) pattern every sample and head shares (causal and/or a broadcast bool
        mask), for readers that count the keys a query may see; None when the mask
        differs per sample or head, or is a float mask."""
        N, H, L, S = self.shape
        mask = self.mask
        if mask is not None and (mask.dtype != torch.bool or mask.shape[0] != 1
                                 or mask.shape[1] != 1):
            return None
        keep = None if mask is None else mask[0, 0, :, :S].expand(L, S)  # (L, S)
        if self.is_causal:
            tri = torch.ones(L, S, dtype=torch.bool, device=self.queries.device).tril()
            keep = tri if keep is None else keep & tri
        return None if keep is None else FullMask(keep)

    def scores(self) -> SoftmaxScores:
        """These logits as :class:`~transformer_core.events.SoftmaxScores`: ``is_causal``
        as the band (None, 0), a bool mask as a mask, a float mask as a bias."""
        self.check_fresh()
        mask = self.mask
        floating = mask is not None and mask.dtype != torch.bool
        return SoftmaxScores(self.queries, self.keys, self.scale,
                             (None, 0) if self.is_causal else (None, None),
                             () if mask is None or floating else (mask,),
                             mask if floating else None, self.softcap)

    def check_fresh(self) -> None:
        """Raise :class:`StaleEventError` if queries or keys changed since dispatch."""
        now = (_version(self.queries), _version(self.keys))
        if self.versions and now != self.versions:
            raise StaleEventError(
                "attention event read after its keys or queries were changed in place "
                "(a static key cache during generate writes the next token into the same "
                "tensor); read the event in its handler, or keep event.sample_copy(n)")

    def logits(self, samples: Any, heads: Any) -> torch.Tensor:
        """Scaled, capped, masked dot products (n, h, L, S); masked entries -inf
        (bool masks and ``is_causal``) or shifted by the float mask."""
        self.check_fresh()
        H, K = self.queries.shape[2], self.keys.shape[2]
        head_idx = torch.arange(H, device=self.queries.device)[heads]  # (h,)
        q = self.queries[samples][:, :, head_idx]  # (n, L, h, E)
        k = self.keys[samples][:, :, head_idx // (H // K)]  # (n, S, h, E)
        logits = torch.einsum("nlhe,nshe->nhls", q, k) * self.scale  # (n, h, L, S)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        L, S = logits.shape[-2:]
        if self.is_causal:
            tri = torch.ones(L, S, dtype=torch.bool, device=logits.device).tril()
            logits = logits.masked_fill(~tri, float("-inf"))
        if self.mask is not None:
            m = self.mask[..., :S]
            m = m[samples] if m.shape[0] > 1 else m  # (n|1, H|1, L|1, S)
            m = m[:, head_idx] if m.shape[1] > 1 else m
            if m.dtype == torch.bool:
                logits = logits.masked_fill(~m, float("-inf"))
            else:
                logits = logits + m.to(logits.dtype)
        return logits

    def matrix(self, samples: Any, heads: Any) -> torch.Tensor:
        """softmax of :meth:`logits` (n, h, L, S); a row with every key masked is zeros."""
        logits = self.logits(samples, heads)
        matrix = torch.softmax(logits, dim=-1)
        if self.is_causal or (self.mask is not None and self.mask.dtype == torch.bool):
            matrix = matrix.masked_fill(torch.isneginf(logits).all(-1, keepdim=True), 0.0)
        return matrix

    def sample(self, n: int) -> SDPACall:
        """Sample ``n`` alone, owning detached copies (N = 1)."""
        mask = self.mask
        if mask is not None:
            mask = (mask[n : n + 1] if mask.shape[0] > 1 else mask).detach().clone()
        q = self.queries[n : n + 1].detach().clone()  # (1, L, H, E)
        k = self.keys[n : n + 1].detach().clone()  # (1, S, K, E)
        return replace(self, queries=q, keys=k, mask=mask, versions=(q._version, k._version))

    @staticmethod
    def concat(calls: Sequence[SDPACall]) -> SDPACall | None:
        """One call of all samples, or None when their masks or settings differ."""
        first = calls[0]
        same = all((c.is_causal, c.scale, c.softcap, c.queries.shape[1:], c.keys.shape[1:])
                   == (first.is_causal, first.scale, first.softcap, first.queries.shape[1:],
                       first.keys.shape[1:]) for c in calls)
        masks = [c.mask for c in calls]
        if not same:
            return None
        if all(m is None for m in masks):
            mask = None
        elif any(m is None for m in masks) or len({(m.dtype, m.shape[1:]) for m in masks}) > 1:
            return None
        else:
            mask = torch.cat([m.expand(c.queries.shape[0], *m.shape[1:])
                              for m, c in zip(masks, calls, strict=True)])
        q = torch.cat([c.queries for c in calls])  # (T, L, H, E)
        k = torch.cat([c.keys for c in calls])  # (T, S, K, E)
        return replace(first, queries=q, keys=k, mask=mask, versions=(q._version, k._version))


def sdpa_event(source: Any, call: SDPACall, role: str = "self",
               attention_type: str = "full") -> AttentionEvent:
    """The lazy :class:`AttentionEvent` (N, H, L, S) of ``call``, emitted by ``source``.

    >>> q, k = torch.randn(2, 3, 5, 4), torch.randn(2, 1, 5, 4)  # 3 query heads, 1 key head
    >>> ev = sdpa_event(None, SDPACall.of(q, k, is_causal=True))
    >>> ev.shape, ev.attention(sample=1, heads=2).shape
    ((2, 3, 5, 5), torch.Size([5, 5]))
    >>> bool(ev.attention_matrix[0, 0].triu(1).eq(0).all())
    True
    """
    H = call.queries.shape[2]
    K = call.keys.shape[2]
    keys = call.keys if K == H else call.keys.repeat_interleave(H // K, dim=2)  # (N, S, H, E)

    def copy(n: int) -> AttentionEvent:
        return sdpa_event(source, call.sample(n), role, attention_type)

    def concat(events: Sequence[AttentionEvent]) -> AttentionEvent | None:
        calls = [getattr(e, "sdpa_call", None) for e in events]
        if any(c is None for c in calls):
            return None
        joined = SDPACall.concat(calls)
        return None if joined is None else sdpa_event(source, joined, role, attention_type)

    event = AttentionEvent(
        source, call.shape, call.logits, call.matrix,
        queries=call.queries, keys=keys, attn_mask=call.shared_mask(),
        softmax_temp=call.scale, role=role,
        attention_type=attention_type, copy_fn=copy, concat_fn=concat, scores_fn=call.scores,
        recipe=Recipe("sdpa", {"is_causal": call.is_causal, "scale": call.scale,
                               "softcap": call.softcap},
                      {"queries": call.queries, "keys": call.keys, "mask": call.mask}))
    event.sdpa_call = call
    return event


def sdpa_event_of(source: Any, queries: torch.Tensor, keys: torch.Tensor,
                  mask: torch.Tensor | None = None, *, is_causal: bool, scale: float,
                  softcap: float | None = None, role: str = "self",
                  attention_type: str = "full") -> AttentionEvent:
    """:func:`sdpa_event` from an :class:`SDPACall`'s fields (queries (N, L, H, E), keys
    (N, S, K, E)): how :mod:`transformer_core.events.portable` builds it again."""
    call = SDPACall(queries, keys, mask, bool(is_causal), float(scale),
                    None if softcap is None else float(softcap))
    return sdpa_event(source, call, role, attention_type)
