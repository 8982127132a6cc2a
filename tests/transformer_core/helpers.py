"""Float64 reference computations and a recording handler for the tests.

Shape legend: N batch, L queries, S keys, H heads, E query/key dim, D value dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reference_softmax_attention(q, k, v, allowed=None, scale=None):
    """Plain float64 softmax attention.

    q (N, L, H, E), k (N, S, H, E), v (N, S, H, D); ``allowed`` is a bool tensor
    broadcastable to (N, H, L, S). Returns (out (N, L, H, D), matrix (N, H, L, S)).
    A query with no allowed key gets an all-zero row and a zero output, as
    ``scaled_dot_product_attention`` does.
    """
    q, k, v = q.double(), k.double(), v.double()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = torch.einsum("nlhe,nshe->nhls", q, k) * scale
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    matrix = torch.softmax(logits, dim=-1)
    if allowed is not None:
        matrix = matrix.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    return torch.einsum("nhls,nshd->nlhd", matrix, v), matrix


def reference_linear_attention(q, k, v, key_allowed=None, causal=False, eps=1e-6):
    """Plain float64 linear attention with phi(x) = elu(x) + 1, written quadratically.

    ``key_allowed`` (N, S) bool zeroes padded keys. Returns (out (N, L, H, D),
    implied matrix (N, H, L, S)).
    """
    phi_q, phi_k = F.elu(q.double()) + 1, F.elu(k.double()) + 1
    if key_allowed is not None:
        phi_k = phi_k * key_allowed[:, :, None, None].double()
    scores = torch.einsum("nlhe,nshe->nhls", phi_q, phi_k)
    if causal:
        scores = scores.tril()
    matrix = scores / (scores.sum(-1, keepdim=True) + eps)
    return torch.einsum("nhls,nshd->nlhd", matrix, v.double()), matrix


class Recorder:
    """A handler that keeps every event it is given."""

    def __init__(self) -> None:
        self.events: list = []

    def __call__(self, event) -> None:
        self.events.append(event)
