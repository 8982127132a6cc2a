"""Turning captures into protocol messages, once per (capture, view).

Runs in the hub's encoder thread (a capture's data may still have to be computed);
results are cached on the capture, so subscribers with the same view parameters
share one encoding and the event loop sends cached ones at once. Head statistics
arrive reduced (where the attention was computed); here they are only formatted.

>>> pool_labels(["a", "b", "c", "d", "e"], 2)
['a…b', 'c…d', 'e']
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from ..contract.plan import Capture
from ..contract.protocol import encode_frame
from ..core.jsonsafe import json_safe
from ..core.reduce import layer_statistics, pool_labels
from ..core.reduce import pool_factor as pool_factor  # re-exported: the views' pooling
from ..core.reduce import pool_matrix as pool_matrix
from ..core.roles import PATTERN_NAMES
from ..core.stats import STAT_NAMES, valid_key_counts


def quantise(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """float -> (uint8, scale, offset) with ``value = offset + scale * byte``; non-finite -> 0."""
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, np.uint8), 1.0, 0.0
    lo = float(values[finite].min())
    hi = float(values[finite].max())
    scale = (hi - lo) / 255.0 or 1.0
    q = np.where(finite, np.round((np.where(finite, values, lo) - lo) / scale), 0)
    return q.clip(0, 255).astype(np.uint8), scale, lo


def _select_heads(cap: Capture, heads: tuple[int, ...] | None, dim: int) -> tuple[
        torch.Tensor, tuple[int, ...]]:
    if heads is None or heads == cap.heads:
        return cap.data, cap.heads
    index = [cap.heads.index(h) for h in heads if h in cap.heads]
    return cap.data.index_select(dim, torch.tensor(index, dtype=torch.long)), tuple(
        cap.heads[i] for i in index)


def _array(values: torch.Tensor, dtype: str) -> tuple[np.ndarray, float | None, float | None]:
    if dtype == "uint8":
        return quantise(values.float().numpy())
    return values.to(torch.float16).numpy().astype("<f2", copy=False), None, None


_STATS_KEY = "json"  # a head_stats capture has one encoding, for every view


def view_key(cap: Capture, heads: tuple[int, ...] | None, max_side: int, dtype: str) -> Any:
    """The key of ``cap``'s encoding for one view in ``cap.cache`` (one text for
    head_stats, whatever the view)."""
    return _STATS_KEY if cap.kind == "head_stats" else (heads, max_side, dtype)


def encode(run_id: str, cap: Capture, heads: tuple[int, ...] | None, max_side: int,
           dtype: str) -> str | bytes:
    """The message of any capture for one view (cached): may compute a capture whose data
    is still pending, so the hub calls it off the event loop unless it is cached."""
    if cap.kind == "head_stats":
        return encode_stats(run_id, cap)
    return encode_binary(run_id, cap, heads, max_side, dtype)


def encode_binary(run_id: str, cap: Capture, heads: tuple[int, ...] | None, max_side: int,
                  dtype: str) -> bytes:
    """The binary frame of an attention, qk_logits or qkv_norms capture for one view (cached)."""
    key = view_key(cap, heads, max_side, dtype)
    cached = cap.cache.get(key)
    if cached is not None:
        return cached
    cap.wait()
    pool = 1
    labels = cap.labels
    if cap.kind == "qkv_norms":
        values, used = _select_heads(cap, heads, 1)  # (3, h, P)
    else:
        values, used = _select_heads(cap, heads, 0)  # (h, L, S), or pooled by cap.pool
        length, keys = cap.full_shape or values.shape[1:]
        pool = pool_factor(length, keys, max_side)
        if pool % cap.pool == 0:
            values = pool_matrix(values, pool // cap.pool)
        else:  # pooled for another view size: pool what there is
            more = pool_factor(values.shape[1], values.shape[2], max_side)
            values, pool = pool_matrix(values, more), cap.pool * more
        if labels is not None:
            labels = (pool_labels(labels[0], pool), pool_labels(labels[1], pool))
    array, scale, offset = _array(values, dtype)
    header = {
        "type": "frame", "run": run_id, "step": cap.step, "kind": cap.kind, "layer": cap.layer,
        "heads": list(used), "sample": cap.sample, "shape": list(array.shape), "dtype": dtype,
        "scale": scale, "offset": offset, "pool": pool, "role": cap.role,
        "labels": None if labels is None else {"queries": labels[0], "keys": labels[1]},
        "time": cap.time,
    }
    frame = encode_frame(header, array)
    cap.cache[key] = frame
    return frame


def encode_stats(run_id: str, cap: Capture) -> str:
    """The ``head_stats`` JSON text of a head_stats capture (cached)."""
    cached = cap.cache.get(_STATS_KEY)
    if cached is not None:
        return cached
    data = cap.wait()
    names = STAT_NAMES + PATTERN_NAMES
    if data.ndim == 3:  # attention (H, L, S) from an older remote publisher
        L, S = data.shape[-2:]
        valid = None if cap.masks is None else valid_key_counts(cap.masks, cap.sample, L, S)
        data = layer_statistics(data, valid)
    rows = data[: len(names)].tolist()  # (11, H)
    message: dict[str, Any] = {
        "type": "head_stats", "run": run_id, "step": cap.step, "layer": cap.layer,
        "sample": cap.sample, "heads": list(cap.heads), "time": cap.time,
    }
    for name, row in zip(names, rows, strict=True):
        if name in ("nan", "inf"):
            message[name] = [int(x) for x in row]
        else:
            message[name] = json_safe(row)
    text = json.dumps(message, separators=(",", ":"))
    cap.cache[_STATS_KEY] = text
    return text
