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
    at most 2 G C blocks and at most twice as many rows as queries. Rows are
    addressed in the attention's own (N, L, H, X) layout, so nothing is transposed.
    """

    source: torch.Tensor  # (P * size,) row n L H + i H + h of each slot; padding: row 0
    slot: torch.Tensor  # (N * L * H,) the slot of each query, in (n, i, h) order
    cluster: torch.Tensor  # (P,) flat cluster (n H + h) C + c of each block
    position: torch.Tensor  # (P * size,) query position i of each slot; -1 for padding
    size: int


def blocks(assign: torch.Tensor, clusters: int) -> Blocks:
    """The :class:`Blocks` of cluster assignments ``assign`` (N, H, L) into ``clusters``.

    Padding slots read row 0: whatever they compute is never read back, so it
    gets no gradient either.
    """
    N, H, L = assign.shape
    G = N * H
    device = assign.device
    size = max(1, -(-L // clusters))
    cluster = (assign.reshape(G, L)
               + torch.arange(G, device=device)[:, None] * clusters).reshape(G * L)
    order = torch.sort(cluster, stable=True).indices  # g L + i, grouped by cluster
    counts = torch.bincount(cluster, minlength=G * clusters)  # (G C,)
    per_cluster = -(-counts // size)  # blocks of each cluster
    first_block = torch.cumsum(per_cluster, 0) - per_cluster
    first_query = torch.cumsum(counts, 0) - counts
    ordered = cluster[order]
    rank = torch.arange(G * L, device=device) - first_query[ordered]  # rank in its cluster
    slot_of_sorted = (first_block[ordered] + rank // size) * size + rank % size
    P = int(per_cluster.sum())
    slot = torch.empty_like(cluster).index_copy_(0, order, slot_of_sorted)  # (G L,)
    slot = slot.reshape(N, H, L).transpose(1, 2).reshape(N * L * H)  # (n, i, h) order
    g, i = order // L, order % L
    row = (g // H) * (L * H) + i * H + g % H  # row of (g, i) in (N, L, H, X)
    source = torch.zeros(P * size, dtype=torch.long, device=device)
    source = source.index_copy_(0, slot_of_sorted, row)
    position = torch.full((P * size,), -1, dtype=torch.long, device=device)
    position = position.index_copy_(0, slot_of_sorted, i)
    block_cluster = torch.repeat_interleave(torch.arange(G * clusters, device=device),
                                            per_cluster, output_size=P)
    return Blocks(source, slot, block_cluster, position, size)


def to_blocks(t: torch.Tensor, layout: Blocks) -> torch.Tensor:
    """Per-query rows ``t`` (N, L, H, X) -> (P, size, X) (differentiable)."""
    X = t.shape[-1]
    return t.reshape(-1, X).index_select(0, layout.source).reshape(-1, layout.size, X)


def from_blocks(t: torch.Tensor, layout: Blocks, shape: tuple[int, int, int]) -> torch.Tensor:
    """Block rows ``t`` (P, size, X) -> per-query rows (N, L, H, X) for ``shape``
    (N, L, H) (differentiable)."""
    X = t.shape[-1]
    return t.reshape(-1, X).index_select(0, layout.slot).reshape(*shape, X)


def block_keys(t: torch.Tensor, top: torch.Tensor, layout: Blocks) -> torch.Tensor:
    """Rows of ``t`` (N, S, H, X) at each block's cluster's top keys ``top``
    (N, H, C, k): (P, k, X), differentiable in ``t``."""
    N, S, H, X = t.shape
    C, k = top.shape[2:]
    n = torch.arange(N, device=top.device)[:, None, None, None] * (S * H)
    h = torch.arange(H, device=top.device)[None, :, None, None]
    rows = (n + top * H + h).reshape(N * H * C, k)[layout.cluster]  # (P, k)
    return t.reshape(N * S * H, X).index_select(0, rows.reshape(-1)).reshape(-1, k, X)
