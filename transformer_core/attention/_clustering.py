"""Grouping queries for clustered attention: LSH codes, then Lloyd iterations in
Hamming space (Vyas et al., 2020, "Fast Transformers with Clustered Attention").

Tensors are laid out (N, H, L, ...): N batch, H heads, L queries, B bits, C clusters.
"""

from __future__ import annotations

import torch


def hash_codes(queries: torch.Tensor, bits: int, hash_bias: bool = True) -> torch.Tensor:
    """(N, H, L, E) -> (N, H, L, B) codes in {0, 1}: signs of ``bits`` random hyperplanes.

    With ``hash_bias`` the hyperplanes have random offsets, so that Hamming distance
    follows Euclidean distance; without, they pass through 0 (cosine distance).
    """
    E = queries.shape[-1]
    planes = torch.randn(bits, E + 1, device=queries.device, dtype=queries.dtype)
    offsets = planes[:, E] if hash_bias else torch.zeros_like(planes[:, E])
    return ((queries @ planes[:, :E].T + offsets) > 0).to(queries.dtype)  # (N, H, L, B)


def _hamming(codes: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Hamming distances (N, H, L, C) of codes (N, H, L, B) to centroids (N, H, C, B)."""
    agree = codes @ centroids.transpose(-1, -2)  # (N, H, L, C): bits both 1
    return codes.sum(-1, keepdim=True) + centroids.sum(-1)[:, :, None, :] - 2 * agree


def lloyd(codes: torch.Tensor, valid: torch.Tensor | None, clusters: int,
          iterations: int) -> torch.Tensor:
    """Cluster ``codes`` (N, H, L, B) into ``min(clusters, L)`` groups; returns each
    query's cluster (N, H, L), int64.

    Centroids start at evenly spaced real queries and move to the bitwise majority
    of their members; an emptied cluster keeps its centroid. Padded queries
    (``valid`` (N, L) False) are assigned but do not move centroids.
    """
    N, H, L, B = codes.shape
    C = min(clusters, L)
    weight = codes.new_ones(N, 1, L) if valid is None else valid[:, None, :].to(codes.dtype)
    lengths = weight[:, 0].sum(-1).clamp(min=1)  # (N,)
    starts = (torch.arange(C, device=codes.device)[None, :] * lengths[:, None] / C).long()
    index = starts[:, None, :, None].expand(N, H, C, B)
    centroids = codes.gather(2, index)  # (N, H, C, B)
    for _ in range(iterations):
        assign = _hamming(codes, centroids).argmin(-1)  # (N, H, L)
        counts = codes.new_zeros(N, H, C).scatter_add_(2, assign, weight.expand(N, H, L))
        members = codes * weight[..., None]  # (N, H, L, B)
        ones = codes.new_zeros(N, H, C, B).scatter_add_(
            2, assign[..., None].expand(N, H, L, B), members)
        majority = (2 * ones > counts[..., None]).to(codes.dtype)
        centroids = torch.where(counts[..., None] > 0, majority, centroids)
    return _hamming(codes, centroids).argmin(-1)


def centroids_of(queries: torch.Tensor, assign: torch.Tensor, valid: torch.Tensor | None,
                 clusters: int) -> torch.Tensor:
    """Mean query (N, H, C, E) of each cluster; differentiable in ``queries`` (N, H, L, E).

    Padded queries (``valid`` False) are left out; an empty cluster's centroid is 0.
    """
    N, H, L, E = queries.shape
    weight = queries.new_ones(N, 1, L) if valid is None else valid[:, None, :].to(queries.dtype)
    weight = weight.expand(N, H, L)
    counts = queries.new_zeros(N, H, clusters).scatter_add(2, assign, weight)
    sums = queries.new_zeros(N, H, clusters, E).scatter_add(
        2, assign[..., None].expand(N, H, L, E), queries * weight[..., None])
    return sums / counts.clamp(min=1)[..., None]


def per_query(per_cluster: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """Rows (N, H, C, X) of each query's cluster: (N, H, L, X)."""
    X = per_cluster.shape[-1]
    return per_cluster.gather(2, assign[..., None].expand(*assign.shape, X))
