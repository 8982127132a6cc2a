"""A stored capture as the page draws it: one layer as a binary frame of docs/protocol.md,
and every head's statistics, role scores and role (the answer of ``GET /heads``).

Shape legend: N samples, h heads kept, L queries, S keys, K layers.

>>> import numpy as np
>>> p = np.stack([np.eye(3), np.full((3, 3), 1 / 3)])[None].astype(np.float32)  # (1, 2, 3, 3)
>>> meta = {"step": 7, "layers": [0], "heads": None, "labels": [["a", "b", "c"]],
...         "roles": ["self"]}
>>> header, values = capture_frame("cap", "demo", meta, p, layer=0)
>>> header["step"], header["shape"], header["labels"]["keys"], values.dtype.name
(7, [2, 3, 3], ['a', 'b', 'c'], 'float16')
>>> [(h.head, h.role) for h in capture_heads({0: p}, meta, sample=0)]
[(0, 'diagonal'), (1, 'local')]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ...core.capture import CaptureError
from ...core.limits import LimitError, parse_index_list
from ...core.reduce import layer_statistics, pool_labels
from ...core.roles import PATTERN_NAMES, assign_roles
from ...core.standalone import valid_keys
from ...core.stats import HEAD_STATISTICS, STAT_NAMES, with_repeat_rows
from ..frames import pool_factor, pool_matrix
from ..history.heads import head_list
from ..history.models import HeadPublic

FRAME_KINDS = ("attention", "qk_logits")


def captured_heads(meta: Mapping[str, Any], count: int) -> list[int]:
    """The head indices of a capture's (N, h, L, S) tensors: its ``heads``, else 0..h-1."""
    heads = meta.get("heads")
    return list(heads) if heads else list(range(count))


def pick_heads(kept: list[int], wanted: str | None) -> list[int]:
    """Positions in ``kept`` of ``wanted`` (comma-separated head indices; None: all);
    :class:`CaptureError` (field ``heads``) for one the capture does not hold."""
    if wanted is None or not wanted.strip():
        return list(range(len(kept)))
    try:
        heads = parse_index_list("heads", wanted, max(kept) + 1, where="this capture")
    except LimitError as exc:
        raise CaptureError("heads", exc.message) from None
    missing = [h for h in heads if h not in kept]
    if missing:
        raise CaptureError("heads", f"head {missing[0]} is not in this capture (it holds "
                           f"heads {kept})")
    return [kept.index(h) for h in heads]


def capture_frame(capture_id: str, run: str, meta: Mapping[str, Any], tensor: np.ndarray,
                  layer: int, kind: str = "attention", sample: int = 0,
                  heads: list[int] | None = None, max_side: int = 128,
                  ) -> tuple[dict[str, Any], np.ndarray]:
    """The frame header and float16 values (h, L', S') of ``tensor`` (N, h, L, S), the
    ``kind`` of layer ``layer`` of a capture: sample ``sample``, the heads at positions
    ``heads`` (None: all), average-pooled to ``max_side``, with the capture's token labels."""
    if not 0 <= sample < tensor.shape[0]:
        raise CaptureError("sample", f"sample {sample} out of range: the capture has "
                           f"{tensor.shape[0]} samples")
    kept = captured_heads(meta, tensor.shape[1])
    chosen = list(range(len(kept))) if heads is None else heads
    values = torch.from_numpy(np.array(tensor[sample, chosen], np.float32))  # (h, L, S)
    length, keys = values.shape[1:]
    pool = pool_factor(length, keys, max_side)
    values = pool_matrix(values, pool)  # as the stream's views: a masked logit's -inf stays
    labels = _labels(meta, sample)
    roles = meta.get("roles") or []
    cross = layer < len(roles) and roles[layer] == "cross"
    queries = pool_labels(labels, pool) if labels and len(labels) == length else None
    keyed = pool_labels(labels, pool) if labels and not cross and len(labels) == keys else None
    header = {"type": "frame", "run": run, "step": meta.get("step"), "kind": kind,
              "layer": layer, "heads": [kept[i] for i in chosen], "sample": sample,
              "shape": list(values.shape), "dtype": "float16", "scale": None, "offset": None,
              "pool": pool, "role": "cross" if cross else "self",
              "labels": None if queries is None and keyed is None
              else {"queries": queries, "keys": keyed},
              "capture": capture_id}
    return header, values.to(torch.float16).numpy().astype("<f2", copy=False)


def _labels(meta: Mapping[str, Any], sample: int) -> list[str] | None:
    labels = meta.get("labels")
    return list(labels[sample]) if labels and sample < len(labels) else None


def capture_heads(attention: Mapping[int, np.ndarray], meta: Mapping[str, Any],
                  sample: int = 0) -> list[HeadPublic]:
    """Every head of the layers in ``attention`` (layer -> (N, h, L, S)) of one sample: its
    statistics and role scores (the stream's, computed here from the matrix) and role.
    Induction scores need a repeated probe: they are null."""
    if not attention:
        return []
    layers = max(attention) + 1
    width = max(max(captured_heads(meta, a.shape[1])) + 1 for a in attention.values())
    stats = np.full((layers, len(HEAD_STATISTICS), width), np.nan)  # (K, 13, H)
    roles: list[list[str | None]] = [[None] * width for _ in range(layers)]
    shown = set()
    for layer, tensor in attention.items():
        if not 0 <= sample < tensor.shape[0]:
            raise CaptureError("sample", f"sample {sample} out of range: the capture has "
                               f"{tensor.shape[0]} samples")
        p = torch.from_numpy(np.array(tensor[sample], np.float32))  # (h, L, S)
        rows = layer_statistics(p, valid_keys(p))  # (11, h)
        scores = {name: rows[len(STAT_NAMES) + i] for i, name in enumerate(PATTERN_NAMES)}
        kept = captured_heads(meta, tensor.shape[1])
        assigned = assign_roles(scores, [None] * len(kept))
        rows = with_repeat_rows(rows).numpy()  # (13, h)
        for i, head in enumerate(kept):
            stats[layer, :, head] = rows[:, i]
            roles[layer][head] = assigned[i]
            shown.add((layer, head))
    out = head_list(stats, roles, [[None] * width for _ in range(layers)])
    return [h for h in out if (h.layer, h.head) in shown]
