"""Masks and how they are handed to the fused kernel."""

from __future__ import annotations

import pytest
import torch

from transformer_core.attention._masks import apply_masks, sdpa_mask
from transformer_core.masking import FullMask, LengthMask, TriangularCausalMask


def test_full_mask_forms():
    assert FullMask(3).shape == (3, 3) and FullMask(3).all_ones
    assert FullMask(2, 5).shape == (2, 5)
    assert FullMask(N=2, M=4).bool_matrix.shape == (2, 4)
    assert FullMask(N=2, M=4).bool_matrix.all()
    explicit = torch.tensor([[True, False], [True, True]])
    mask = FullMask(explicit)
    assert mask.bool_matrix is explicit and not mask.all_ones and mask.lower_triangular
    assert FullMask(torch.ones(2, 2, dtype=torch.bool)).all_ones


def test_full_mask_of_ones_builds_no_matrix_until_asked():
    mask = FullMask(4096, 4096)
    assert mask.all_ones and mask.shape == (4096, 4096)
    assert mask._mask is None


@pytest.mark.parametrize(
    ("args", "match"),
    [((torch.ones(2, 2),), "bool"), ((torch.ones(2, 2, 2, dtype=torch.bool),), "2-D"),
     ((), "size N")],
)
def test_full_mask_errors(args, match):
    with pytest.raises(ValueError, match=match):
        FullMask(*args)


def test_float_and_additive_views():
    mask = FullMask(torch.tensor([[True, False]]))
    assert mask.float_matrix.tolist() == [[1.0, 0.0]]
    assert mask.additive_matrix.tolist() == [[0.0, float("-inf")]]


def test_length_mask():
    mask = LengthMask(torch.tensor([1, 3, 2]))
    assert mask.max_len == 3 and not mask.all_ones
    assert mask.bool_matrix.tolist() == [
        [True, False, False], [True, True, True], [True, True, False]]
    assert LengthMask(torch.tensor([2, 2]), max_len=4).bool_matrix.shape == (2, 4)
    assert LengthMask(torch.tensor([4, 4]), max_len=4).all_ones
    full = LengthMask.full(2, 5)
    assert full.all_ones and full.bool_matrix.all() and full.bool_matrix.shape == (2, 5)
    assert LengthMask([1, 2]).lengths.tolist() == [1, 2]


@pytest.mark.parametrize(
    ("lengths", "max_len", "match"),
    [(torch.tensor([[1, 2]]), None, "1-D"), (torch.tensor([5]), 3, "max_len=3"),
     (torch.tensor([-1, 2]), None, "every length")],
)
def test_length_mask_errors(lengths, max_len, match):
    with pytest.raises(ValueError, match=match):
        LengthMask(lengths, max_len)


def test_triangular_causal_mask():
    mask = TriangularCausalMask(3)
    assert mask.bool_matrix.tolist() == [
        [True, False, False], [True, True, False], [True, True, True]]
    assert mask.lower_triangular and not mask.all_ones
    assert mask.lengths.tolist() == [1, 2, 3]
    assert TriangularCausalMask(1).all_ones
    # row i allows exactly j <= i: wide masks qualify (as in fast-transformers), tall ones not
    assert FullMask(torch.ones(2, 3, dtype=torch.bool).tril()).lower_triangular
    assert LengthMask(torch.tensor([1, 2, 3]), max_len=4).lower_triangular
    assert not LengthMask(torch.tensor([1, 1, 3])).lower_triangular
    assert not FullMask(torch.ones(3, 2, dtype=torch.bool).tril()).lower_triangular


def test_full_mask_lengths_of_prefix_rows():
    assert FullMask(torch.ones(3, 3, dtype=torch.bool).tril()).lengths.tolist() == [1, 2, 3]
    assert FullMask(2, 4).lengths.tolist() == [4, 4]
    with pytest.raises(ValueError, match="prefix"):
        _ = FullMask(torch.tensor([[1, 0, 1], [1, 1, 0]]) > 0).lengths


def test_sdpa_mask_forms():
    assert sdpa_mask(None, None, 4, 4) == (None, False)
    assert sdpa_mask(FullMask(4), LengthMask.full(2, 4), 4, 4) == (None, False)
    assert sdpa_mask(TriangularCausalMask(4), LengthMask.full(2, 4), 4, 4) == (None, True)
    dense = FullMask(torch.rand(3, 4) > 0.3)
    mask, causal = sdpa_mask(dense, None, 3, 4)
    assert not causal and mask.shape == (1, 1, 3, 4)
    assert torch.equal(mask[0, 0], dense.bool_matrix)
    lengths = LengthMask(torch.tensor([2, 4]))
    mask, causal = sdpa_mask(None, lengths, 3, 4)
    assert not causal and mask.shape == (2, 1, 1, 4)
    assert mask[:, 0, 0].tolist() == lengths.bool_matrix.tolist()
    mask, causal = sdpa_mask(TriangularCausalMask(4), lengths, 4, 4)  # causal + padding
    assert not causal and mask.shape == (2, 1, 4, 4)
    expected = TriangularCausalMask(4).bool_matrix[None] & lengths.bool_matrix[:, None, :]
    assert torch.equal(mask[:, 0], expected)


def test_apply_masks_selects_samples():
    logits = torch.zeros(2, 1, 2, 3)
    lengths = LengthMask(torch.tensor([1, 3, 2]))
    out = apply_masks(logits, FullMask(torch.tensor([[True, True, False]] * 2)), lengths,
                      torch.tensor([2, 0]))
    assert torch.isinf(out).tolist() == [
        [[[False, False, True]] * 2], [[[False, True, True]] * 2]]
