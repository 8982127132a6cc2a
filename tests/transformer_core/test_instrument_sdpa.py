"""Modules that call F.scaled_dot_product_attention (nanoGPT-style): events equal a
plain softmax of the same q and k; nothing is intercepted while nobody listens."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from transformer_core.instrument import StaleEventError, instrument
from transformer_core.instrument.sdpa import _SDPAMode


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention: one fused call, optionally grouped-query and padded."""

    def __init__(self, n_embd: int = 16, n_head: int = 4, n_kv_head: int = 4) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.n_embd = n_head, n_kv_head, n_embd
        self.head_dim = n_embd // n_head
        self.c_attn = nn.Linear(n_embd, (n_head + 2 * n_kv_head) * self.head_dim)
        self.c_proj = nn.Linear(n_embd, n_embd)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        sizes = [self.n_head * self.head_dim, self.n_kv_head * self.head_dim,
                 self.n_kv_head * self.head_dim]
        q, k, v = self.c_attn(x).split(sizes, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        return q, k, v

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv_head != self.n_head)
        return self.c_proj(y.transpose(1, 2).reshape(x.shape))


class Block(nn.Module):
    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(16)
        self.attn = CausalSelfAttention(**kwargs)

    def forward(self, x, mask=None):
        return x + self.attn(self.ln(x), mask)


class TinyGPT(nn.Module):
    def __init__(self, n_layer: int = 2, **kwargs) -> None:
        super().__init__()
        self.wte = nn.Embedding(11, 16)
        self.blocks = nn.ModuleList(Block(**kwargs) for _ in range(n_layer))

    def forward(self, idx, mask=None):
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x, mask)
        return x


def _reference(attn: CausalSelfAttention, x: torch.Tensor, mask=None) -> torch.Tensor:
    """Plain softmax of the module's own q, k (N, H, L, S)."""
    q, k, _ = attn.qkv(x)
    k = k.repeat_interleave(attn.n_head // attn.n_kv_head, dim=1)
    logits = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)  # (N, H, L, S)
    L = x.shape[1]
    if mask is None:
        mask = torch.ones(L, L, dtype=torch.bool).tril()
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)


def _record(sites) -> list:
    seen = []
    for site in sites:
        site.dispatcher.listen(lambda ev: True, seen.append)
    return seen


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_events_equal_plain_softmax(n_kv_head):
    model = TinyGPT(n_kv_head=n_kv_head).eval()
    sites = instrument(model)
    assert [(s.name, s.kind, s.heads, s.d_model) for s in sites] == [
        ("blocks.0.attn", "sdpa", 4, 16), ("blocks.1.attn", "sdpa", 4, 16)]
    seen = _record(sites)
    idx = torch.randint(0, 11, (2, 7))
    with torch.no_grad():
        model(idx)
        x0 = model.blocks[0].ln(model.wte(idx))
        ref = _reference(model.blocks[0].attn, x0)
    assert len(seen) == 2 and seen[0].source is model.blocks[0].attn
    assert seen[0].attn_mask.lower_triangular  # readers counting visible keys see causal
    torch.testing.assert_close(seen[0].attention_matrix, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(seen[0].attention(sample=1, heads=3), ref[1, 3], atol=1e-5,
                               rtol=0)


def test_padded_bool_mask():
    model = TinyGPT().eval()
    seen = _record(instrument(model))
    idx = torch.randint(0, 11, (2, 5))
    keep = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    keep[1, ..., 3:] = False  # sample 1: two padded keys
    with torch.no_grad():
        model(idx, keep)
        ref = _reference(model.blocks[0].attn, model.blocks[0].ln(model.wte(idx)), keep)
    torch.testing.assert_close(seen[0].attention_matrix, ref, atol=1e-5, rtol=0)


def test_outputs_bit_identical_and_nothing_intercepted_without_listener(monkeypatch):
    model = TinyGPT().eval()
    idx = torch.randint(0, 11, (2, 7))
    with torch.no_grad():
        plain = model(idx)
    sites = instrument(model)
    entered = []
    monkeypatch.setattr(_SDPAMode, "__enter__",
                        lambda self: entered.append(self) or torch.overrides.TorchFunctionMode
                        .__enter__(self))
    with torch.no_grad():
        assert torch.equal(model(idx), plain)
    assert entered == []
    _record(sites)
    with torch.no_grad():
        assert torch.equal(model(idx), plain)
    assert len(entered) == 2


def test_include_and_no_attention_error():
    class Hidden(nn.Module):  # calls SDPA through a helper: not found on its own
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48)

        def forward(self, x):
            return self._attend(x)

        def _attend(self, x):
            q, k, v = self.qkv(x).view(*x.shape[:2], 3, 4, 4).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v)  # (N, 4, L, 4)

    model = nn.Sequential(nn.Linear(16, 16), Hidden())
    with pytest.raises(ValueError, match="no attention module found in Sequential"):
        instrument(model)
    with pytest.raises(ValueError, match="include: no module named"):
        instrument(model, include=["2"])
    sites = instrument(model, include=["1"])
    assert [(s.name, s.kind) for s in sites] == [("1", "sdpa")]
    assert [s.name for s in instrument(model, include=lambda n, m: isinstance(m, Hidden))] \
        == ["1"]
    seen = _record(sites)
    model(torch.randn(1, 3, 16))
    assert seen[0].shape == (1, 4, 3, 3)


def test_stale_read_is_detected():
    events = []
    cache = torch.randn(1, 4, 6, 4)

    class Cached(nn.Module):  # reads keys from a buffer written in place, as a static cache
        def forward(self, q):
            return F.scaled_dot_product_attention(q, cache, cache)

    module = Cached()
    (site,) = instrument(module)
    site.dispatcher.listen(lambda ev: True, events.append)
    module(torch.randn(1, 4, 1, 4))
    events[0].attention(sample=0)  # fine: nothing changed yet
    cache[:, :, 5] = 1.0  # the next step writes its key
    with pytest.raises(StaleEventError, match="sample_copy"):
        events[0].attention(sample=0)


@pytest.mark.slow  # compiling takes seconds
# torch.compile imports code that uses torch.jit (deprecated) on its first use
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_model_no_graph_break_without_listener():
    model = TinyGPT().eval()
    instrument(model)
    idx = torch.randint(0, 11, (2, 7))
    explain = torch._dynamo.explain(model)(idx)
    assert explain.graph_break_count == 0


def test_dispatching_to_redirects_foreign_sites():
    from transformer_core.events import EventDispatcher, dispatching_to

    model = TinyGPT().eval()
    sites = instrument(model)
    own = _record(sites)
    private, seen = EventDispatcher(), []
    private.listen(lambda ev: True, seen.append)
    with dispatching_to(model, private), torch.no_grad():  # a probe pass, say
        model(torch.randint(0, 11, (1, 4)))
    assert own == [] and [ev.source for ev in seen] == [s.module for s in sites]
