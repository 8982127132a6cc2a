"""Grouping queries for clustered attention: LSH codes, then Lloyd iterations in
Hamming space (Vyas et al., 2020, "Fast Transformers with Clustered Attention").

Tensors are laid out (N, H, L, ...): N batch, H heads, L queries, B bits, C clusters.
Inside, the N * H (sample, head) pairs are flattened into G groups, so that every
step is one batched op (a ``bmm``, an ``index_add_``) instead of a loop.
"""

from __future__ import annotations

from typing import NamedTuple

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


def _nearest(codes: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index (G, L) of the nearest centroid (G, C, B) of each code (G, L, B) in Hamming
    distance, the lowest index on ties.

    For codes in {0, 1}, |x - c|_1 = |x| + |c| - 2 x.c; |x| is the same for every
    centroid, so r = |c| - 2 x.c ranks them. One ``baddbmm`` computes r * C + c,
    whose minimum holds both the smallest r and, among equals, the smallest c: a
    plain ``amin`` is several times faster than ``argmin``. All values are small
    integers, exact in floating point while below 1 / eps of the dtype; otherwise
    ``min`` (which returns the first minimum) ranks r itself.
    """
    G, C, B = centroids.shape
    sizes = centroids.sum(-1)[:, None, :]  # (G, 1, C)
    largest_key = (2 * B + 1) * C
    if largest_key * torch.finfo(codes.dtype).eps < 1:
        index = torch.arange(C, device=codes.device, dtype=codes.dtype)
        keyed = torch.baddbmm(sizes * C + index, codes, centroids.transpose(1, 2),
                              alpha=-2 * C)  # (G, L, C)
        return torch.remainder(keyed.amin(-1), C).long()
    rank = torch.baddbmm(sizes, codes, centroids.transpose(1, 2), alpha=-2)  # (G, L, C)
    return rank.min(-1).indices


def lloyd(codes: torch.Tensor, valid: torch.Tensor | None, clusters: int,
          iterations: int) -> torch.Tensor:
    """Cluster ``codes`` (N, H, L, B) into ``min(clusters, L)`` groups; returns each
    query's cluster (N, H, L), int64.

    Centroids start at evenly spaced real queries and move to the bitwise majority
    of their members; an emptied cluster keeps its centroid. Padded queries
    (``valid`` (N, L) False) are assigned but do not move centroids. Stops early
    once an iteration leaves every assignment unchanged: the centroids then stay
    where they are, so the remaining iterations could change nothing.
    """
    N, H, L, B = codes.shape
    C = min(clusters, L)
    G = N * H
    weight = codes.new_ones(N, L) if valid is None else valid.to(codes.dtype)  # (N, L)
    lengths = weight.sum(-1).clamp(min=1)  # (N,)
    starts = (torch.arange(C, device=codes.device)[None, :] * lengths[:, None] / C).long()
    centroids = codes.gather(2, starts[:, None, :, None].expand(N, H, C, B))  # (N, H, C, B)
    centroids = centroids.reshape(G, C, B)
    flat = codes.reshape(G, L, B)
    weight = weight[:, None, :].expand(N, H, L).reshape(G * L)
    members = flat.reshape(G * L, B) * weight[:, None]  # padded queries count for nothing
    offsets = torch.arange(G, device=codes.device)[:, None] * C  # (G, 1)
    assign = _nearest(flat, centroids)  # (G, L)
    for _ in range(iterations):
        index = (assign + offsets).reshape(G * L)
        counts = codes.new_zeros(G * C).index_add_(0, index, weight)
        ones = codes.new_zeros(G * C, B).index_add_(0, index, members)
        majority = (2 * ones > counts[:, None]).to(codes.dtype)
        centroids = torch.where(counts[:, None] > 0, majority, centroids.reshape(G * C, B))
        centroids = centroids.reshape(G, C, B)
        moved = _nearest(flat, centroids)
        if torch.equal(moved, assign):
            break
        assign = moved
    return assign.reshape(N, H, L)


def centroids_of(queries: torch.Tensor, assign: torch.Tensor, valid: torch.Tensor | None,
                 clusters: int) -> torch.Tensor:
    """Mean query (N, H, C, E) of each cluster; differentiable in ``queries`` (N, H, L, E).

    Padded queries (``valid`` False) are left out; an empty cluster's centroid is 0.
    """
    N, H, L, E = queries.shape
    G = N * H
    index = (assign.reshape(G, L)
             + torch.arange(G, device=assign.device)[:, None] * clusters).reshape(G * L)
    rows = queries.reshape(G * L, E)
    if valid is None:
        weight = queries.new_ones(G * L)
    else:
        weight = valid[:, None, :].expand(N, H, L).reshape(G * L).to(queries.dtype)
        rows = rows * weight[:, None]
    counts = queries.new_zeros(G * clusters).index_add_(0, index, weight)
    sums = queries.new_zeros(G * clusters, E).index_add(0, index, rows)  # (G C, E)
    return (sums / counts.clamp(min=1)[:, None]).reshape(N, H, clusters, E)


def per_query(per_cluster: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """Rows (N, H, C, X) of each query's cluster: (N, H, L, X)."""
    X = per_cluster.shape[-1]
    return per_cluster.gather(2, assign[..., None].expand(*assign.shape, X))


class Blocks(NamedTuple):
    """Queries regrouped by cluster into P blocks of ``size`` rows, so that the queries
    of one cluster meet their cluster's keys in one batched matmul.

    Every block holds queries of one cluster only; a cluster of m queries fills
    ceil(m / size) blocks, the last one padded. With ``size`` about L / C there are
    at most 2 G C blocks and at most twice as many rows as queries.
    """

    source: torch.Tensor  # (P * size,) flat query row g * L + i of each slot; G * L: padding
    slot: torch.Tensor  # (G * L,) the slot of each query
    cluster: torch.Tensor  # (P,) flat cluster g * C + c of each block
    position: torch.Tensor  # (P * size,) query position i of each slot; -1 for padding
    size: int


def blocks(assign: torch.Tensor, clusters: int) -> Blocks:
    """The :class:`Blocks` of cluster assignments ``assign`` (G, L) into ``clusters``."""
    G, L = assign.shape
    device = assign.device
    size = max(1, -(-L // clusters))
    cluster = (assign + torch.arange(G, device=device)[:, None] * clusters).reshape(G * L)
    order = torch.sort(cluster, stable=True).indices  # query rows, grouped by cluster
    counts = torch.bincount(cluster, minlength=G * clusters)  # (G C,)
    per_cluster = -(-counts // size)  # blocks of each cluster
    first_block = torch.cumsum(per_cluster, 0) - per_cluster
    first_query = torch.cumsum(counts, 0) - counts
    ordered = cluster[order]
    rank = torch.arange(G * L, device=device) - first_query[ordered]  # rank in its cluster
    slot_of_sorted = (first_block[ordered] + rank // size) * size + rank % size
    P = int(per_cluster.sum())
    slot = torch.empty_like(cluster).index_copy_(0, order, slot_of_sorted)  # (G L,)
    source = torch.full((P * size,), G * L, dtype=torch.long, device=device)
    source = source.index_copy_(0, slot_of_sorted, order)
    position = torch.where(source < G * L, source % L, -1)
    block_cluster = torch.repeat_interleave(torch.arange(G * clusters, device=device),
                                            per_cluster, output_size=P)
    return Blocks(source, slot, block_cluster, position, size)


def to_blocks(t: torch.Tensor, layout: Blocks) -> torch.Tensor:
    """Per-query rows ``t`` (G, L, X) -> (P, size, X), padding rows 0 (differentiable)."""
    G, L, X = t.shape
    padded = torch.cat([t.reshape(G * L, X), t.new_zeros(1, X)])  # (G L + 1, X)
    return padded.index_select(0, layout.source).reshape(-1, layout.size, X)


def from_blocks(t: torch.Tensor, layout: Blocks, G: int) -> torch.Tensor:
    """Block rows ``t`` (P, size, X) -> per-query rows (G, L, X) (differentiable)."""
    X = t.shape[-1]
    return t.reshape(-1, X).index_select(0, layout.slot).reshape(G, -1, X)
