"""Snapshots at the sizes people train: pooled where computed, induction scores at full size."""

from __future__ import annotations

import numpy as np
import torch

from attnscope.backend.history.roles import snapshot_repeat_scores
from attnscope.core.history_items import SnapshotItem
from attnscope.core.reduce import pool_matrix
from attnscope.core.roles import repeat_scores
from transformer_core.attention import FullAttention
from transformer_core.masking import FullMask, LengthMask


def event(L: int, seed: int):
    """A one-sample causal attention event over L positions, 3 heads."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, L, 3, 8, generator=g), torch.randn(1, L, 3, 8, generator=g)
    att = FullAttention(attention_dropout=0.0)
    return att._event(q, k, 0.35, FullMask(torch.ones(L, L).tril().bool()),
                      LengthMask(torch.tensor([L])))


def test_snapshot_matrices_are_pooled_to_max_side_and_scores_come_from_full_size():
    layer0, probe = event(64, 0), event(64, 1)
    item = SnapshotItem("s", 10, 0.0, {0: [layer0]}, None, {0: [probe]}, max_side=16)
    arrays = item.arrays()
    assert set(arrays) == {"attention.0", "repeat_scores.0"}
    stored = arrays["attention.0"]
    assert stored.shape == (1, 3, 16, 16) and stored.dtype == np.float16  # 64 -> 16
    want = pool_matrix(layer0.attention_matrix[0], 4).numpy()  # (H, 16, 16)
    np.testing.assert_allclose(stored[0].astype(np.float32), want, atol=1e-3)
    # The induction scores are those of the full 64 x 64 matrix, not of the pooled one.
    full = repeat_scores(probe.attention_matrix[0], 32)  # (2, H)
    np.testing.assert_allclose(arrays["repeat_scores.0"][0], full.numpy(), atol=1e-6)
    scores = snapshot_repeat_scores(arrays, layers=1)  # (K, 2, H)
    np.testing.assert_allclose(scores[0], full.numpy(), atol=1e-6)


def test_small_snapshots_are_stored_as_they_are():
    e = event(12, 2)
    arrays = SnapshotItem("s", 0, 0.0, {0: [e]}, None, max_side=256).arrays()
    np.testing.assert_allclose(arrays["attention.0"][0].astype(np.float32),
                               e.attention_matrix[0].numpy(), atol=1e-3)


def test_snapshots_written_before_scores_were_stored_are_still_scored():
    probe = event(16, 3)
    old = {"attention.0": np.zeros((1, 3, 16, 16), np.float16),
           "repeat.0": probe.attention_matrix.numpy().astype(np.float16)}
    scores = snapshot_repeat_scores(old, layers=1)
    want = repeat_scores(probe.attention_matrix[0], 8).numpy()
    np.testing.assert_allclose(scores[0], want, atol=2e-3)
