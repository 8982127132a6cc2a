"""run_capture: one forward pass, a private listener, exactly what was asked."""

from __future__ import annotations

import math

import pytest
import torch

from attnscope.contract.layout import LocalModel
from attnscope.core.capture import (
    CaptureError,
    CaptureTooLarge,
    estimate_bytes,
    run_capture,
)
from attnscope.training.demo import DemoConfig, DemoModel
from attnscope.training.run import Run
from transformer_core.builders import TransformerEncoderBuilder
from transformer_core.events import EventDispatcher

CONFIG = DemoConfig(seq_len=8, n_symbols=10, n_layers=2, n_heads=3, d_head=4, feed_forward=16,
                    device="cpu")
ALL_KINDS = ["attention", "qkv", "qk_logits", "intermediate"]


@pytest.fixture
def model() -> DemoModel:
    torch.manual_seed(0)
    return DemoModel(CONFIG, event_dispatcher=EventDispatcher())


def tokens() -> torch.Tensor:
    return torch.tensor([[1, 2, 3, 4, 5, 6], [9, 8, 7, 6, 5, 4]])  # (N=2, L=6)


def direct_attention(layer, x: torch.Tensor, heads: list[int]) -> torch.Tensor:
    """softmax(q k^T / sqrt(E)) from the layer's own projections: (N, h, L, L)."""
    attn = layer.attention
    N, L, _ = x.shape
    q = attn.query_projection(x).view(N, L, attn.n_heads, -1)  # (N, L, H, E)
    k = attn.key_projection(x).view(N, L, attn.n_heads, -1)  # (N, L, H, E)
    logits = torch.einsum("nlhe,nshe->nhls", q, k) / math.sqrt(q.shape[-1])
    return torch.softmax(logits, -1)[:, heads]


def test_attention_equals_a_direct_computation(model: DemoModel) -> None:
    x_tokens = tokens()
    out = run_capture(model, x_tokens, ["attention", "intermediate"], heads=[2, 0])
    with torch.no_grad():
        x0 = model.embedding(x_tokens) + model.position(torch.arange(6))  # (N, L, d_model)
        expected0 = direct_attention(model.encoder.layers[0], x0, [2, 0])
        expected1 = direct_attention(model.encoder.layers[1], out["intermediate.0"], [2, 0])
    assert out["attention.0"].shape == (2, 2, 6, 6)
    torch.testing.assert_close(out["attention.0"], expected0)
    torch.testing.assert_close(out["attention.1"], expected1)
    assert out["intermediate.1"].shape == (2, 6, 12)


def test_kinds_are_consistent_with_each_other(model: DemoModel) -> None:
    out = run_capture(model, tokens(), ALL_KINDS, layers=[1])
    assert set(out) == {"attention.1", "qk_logits.1", "queries.1", "keys.1", "values.1",
                        "intermediate.1"}
    q, k = out["queries.1"], out["keys.1"]  # (N, L, H, E)
    assert q.shape == (2, 6, 3, 4) and out["values.1"].shape == (2, 6, 3, 4)
    logits = torch.einsum("nlhe,nshe->nhls", q, k) / 2.0  # 1/sqrt(E=4)
    torch.testing.assert_close(out["qk_logits.1"], logits)
    torch.testing.assert_close(out["attention.1"], torch.softmax(logits, -1))


def test_only_what_was_asked_is_captured(model: DemoModel) -> None:
    out = run_capture(model, tokens(), ["qkv"], layers=[0], heads=[1])
    assert set(out) == {"queries.0", "keys.0", "values.0"}
    assert out["queries.0"].shape == (2, 6, 1, 4)
    every_head = run_capture(model, tokens(), ["qkv"], layers=[0])
    torch.testing.assert_close(out["keys.0"][:, :, 0], every_head["keys.0"][:, :, 1])
    assert all(t.device.type == "cpu" and not t.requires_grad for t in out.values())


def test_modes_restored_listener_removed_and_no_grad(model: DemoModel) -> None:
    model.train()
    model.encoder.layers[1].eval()  # a mixed state must come back as it was
    before = {name: m.training for name, m in model.named_modules()}
    dispatcher = model.encoder.layers[0].attention.event_dispatcher
    run_capture(model, tokens(), ALL_KINDS)
    assert {name: m.training for name, m in model.named_modules()} == before
    assert not dispatcher.has_listeners
    assert all(p.grad is None for p in model.parameters())


def test_listener_removed_and_modes_restored_when_the_forward_fails(model: DemoModel) -> None:
    model.train()
    dispatcher = model.encoder.layers[0].attention.event_dispatcher
    with pytest.raises(ValueError, match="L <= 8"):
        run_capture(model, torch.zeros(1, 9, dtype=torch.long), ["attention"])
    assert not dispatcher.has_listeners
    assert all(m.training for m in model.modules())


def test_other_listeners_are_untouched(model: DemoModel) -> None:
    dispatcher = model.encoder.layers[0].attention.event_dispatcher
    seen = []
    dispatcher.listen(lambda ev: True, seen.append)
    run_capture(model, tokens(), ["attention"])
    assert seen, "the user's own listener still receives events"
    assert dispatcher.has_listeners


def test_layer_and_head_out_of_range_name_the_field(model: DemoModel) -> None:
    with pytest.raises(CaptureError, match="layer 2 out of range.*2 layers") as exc:
        run_capture(model, tokens(), ["attention"], layers=[2])
    assert exc.value.field == "layers"
    with pytest.raises(CaptureError, match="head 3 out of range.*3 heads") as exc:
        run_capture(model, tokens(), ["attention"], heads=[3])
    assert exc.value.field == "heads"
    with pytest.raises(CaptureError, match="unknown kinds"):
        run_capture(model, tokens(), ["pictures"])


def test_byte_limit_stops_the_capture(model: DemoModel) -> None:
    with pytest.raises(CaptureTooLarge, match="limit of 100 bytes"):
        run_capture(model, tokens(), ["attention"], max_bytes=100)
    assert not model.encoder.layers[0].attention.event_dispatcher.has_listeners


def test_estimate_matches_the_real_size(model: DemoModel) -> None:
    info = LocalModel(model).layout
    out = run_capture(model, tokens(), ALL_KINDS, heads=[0, 1])
    real = sum(t.numel() * t.element_size() for t in out.values())
    assert estimate_bytes(info, 2, 6, ALL_KINDS, [0, 1], [0, 1]) == real


def test_layers_numbered_as_the_run_registry_does(model: DemoModel) -> None:
    info = LocalModel(model).layout
    assert info == Run(model, run_id="r").layout
    assert (info.vocab_size, info.d_model, info.max_len) == (10, 12, 8)


def test_a_feature_model_without_embedding() -> None:
    encoder = TransformerEncoderBuilder.from_kwargs(
        n_layers=1, n_heads=2, query_dimensions=4, value_dimensions=4,
        feed_forward_dimensions=8, event_dispatcher=EventDispatcher()).get()
    info = LocalModel(encoder).layout
    assert info.vocab_size is None and info.d_model == 8
    out = run_capture(encoder, torch.randn(1, 5, 8), ["attention"])
    assert out["attention.0"].shape == (1, 2, 5, 5)
    torch.testing.assert_close(out["attention.0"].sum(-1), torch.ones(1, 2, 5))


def test_float_inputs_follow_the_model_dtype_and_outputs_are_float32() -> None:
    encoder = TransformerEncoderBuilder.from_kwargs(
        n_layers=1, n_heads=2, query_dimensions=4, value_dimensions=4,
        feed_forward_dimensions=8, event_dispatcher=EventDispatcher()).get().double()
    out = run_capture(encoder, torch.randn(1, 3, 8), ["attention", "intermediate"])
    assert out["attention.0"].dtype == torch.float32
    assert out["intermediate.0"].shape == (1, 3, 8)
