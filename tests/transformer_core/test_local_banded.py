"""Local attention computed band by band (long sequences) equals the dense band."""

from __future__ import annotations

import pytest
import torch

from transformer_core.attention import LocalAttention
from transformer_core.events import AttentionEvent, EventDispatcher
from transformer_core.masking import FullMask, LengthMask, TriangularCausalMask


def pair(w: int, dispatcher: str | EventDispatcher = "") -> tuple[LocalAttention, LocalAttention]:
    banded = LocalAttention(w, attention_dropout=0.0, event_dispatcher=dispatcher)
    dense = LocalAttention(w, attention_dropout=0.0)
    dense.use_fused = False  # the explicit (N, H, L, S) path under the band mask
    return banded, dense


@pytest.mark.parametrize("w", [1, 8, 33])
@pytest.mark.parametrize("masks", ["none", "causal", "lengths"])
def test_banded_outputs_and_gradients_equal_the_dense_band(w, masks):
    torch.manual_seed(w)
    N, L, S, H, E = 2, 300, 300, 3, 8
    q = torch.randn(N, L, H, E, dtype=torch.float64, requires_grad=True)
    k = torch.randn(N, S, H, E, dtype=torch.float64, requires_grad=True)
    v = torch.randn(N, S, H, 5, dtype=torch.float64, requires_grad=True)
    attn = TriangularCausalMask(L) if masks == "causal" else FullMask(L, S)
    lengths = LengthMask(torch.tensor([S, 251]), max_len=S) if masks == "lengths" \
        else LengthMask(torch.tensor([S, S]), max_len=S)
    banded, dense = pair(w)
    out = banded(q, k, v, attn, None, lengths)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = dense(q, k, v, attn, None, lengths)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)


def test_banded_event_matrix_is_the_band_applied_and_keys_past_queries_work():
    torch.manual_seed(0)
    d = EventDispatcher()
    seen: list[AttentionEvent] = []
    d.listen(AttentionEvent, seen.append)
    q, k, v = torch.randn(1, 200, 2, 4), torch.randn(1, 260, 2, 4), torch.randn(1, 260, 2, 4)
    banded, dense = pair(16, d)
    out = banded(q, k, v, FullMask(200, 260), None, LengthMask(torch.tensor([260])))
    ref = dense(q, k, v, FullMask(200, 260), None, LengthMask(torch.tensor([260])))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    matrix = seen[0].attention_matrix  # (1, H, 200, 260)
    recomputed = torch.einsum("nhls,nshd->nlhd", matrix, v)
    torch.testing.assert_close(recomputed, out, rtol=1e-5, atol=1e-5)
    assert (matrix[0, 0, 100, :92] == 0).all() and (matrix[0, 0, 100, 108:] == 0).all()
