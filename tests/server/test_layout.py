"""ModelLayout: one description of a model's attention sites, built once from
``transformer_core.instrument.instrument`` and the same on both ends of the wire."""

from __future__ import annotations

import dataclasses

import pytest
import torch.nn as nn
from stream_support import Wrapped, small_encoder

from attnscope.backend.remote.run import RemoteRun
from attnscope.contract.captures import model_info_from_message, model_info_message
from attnscope.contract.layout import LocalModel, ModelLayout, SiteLayout
from attnscope.training.run import Run
from transformer_core.builders import TransformerDecoderBuilder
from transformer_core.events import EventDispatcher


def test_a_wrapped_encoder_is_described_by_its_sites() -> None:
    local = LocalModel(Wrapped(small_encoder(EventDispatcher(), n_layers=3), 8))
    layout = local.layout
    assert [s.name for s in layout.sites] == [
        f"encoder.layers.{i}.attention.inner_attention" for i in range(3)]
    assert {(s.heads, s.d_model, s.qkv, s.kind) for s in layout.sites} == {
        (2, 8, True, "transformer_core")}
    assert (layout.vocab_size, layout.max_len, layout.d_model) == (None, None, 8)
    # How events are told apart: each site's attention module and its QKV source.
    assert sorted(local.sources.values()) == [(w, i) for w in ("attn", "qkv") for i in range(3)]
    assert all(block is not None for block in local.blocks)  # the encoder layers


def test_decoder_sites_carry_their_role_and_type() -> None:
    model = TransformerDecoderBuilder.from_kwargs(
        n_layers=1, n_heads=2, query_dimensions=4, value_dimensions=4,
        feed_forward_dimensions=8, cross_attention_type="linear").get()
    layout = LocalModel(model).layout
    assert [(s.role, s.attention_type) for s in layout.sites] == [
        ("self", "full"), ("cross", "linear")]
    assert layout.summary(seq_len=5)["attention_type"] == "mixed"


def test_a_model_without_attention_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="Linear"):
        LocalModel(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="sites"):
        ModelLayout(sites=())


def test_a_site_with_unknown_heads_and_width_survives_the_wire() -> None:
    # What an adapter for a foreign model may find: no heads, no d_model, no QKV events.
    site = SiteLayout(index=0, name="h.0.attn", heads=None, d_model=None, qkv=False,
                      kind="huggingface")
    layout = ModelLayout(sites=(site,))
    back = ModelLayout.from_message(layout.to_message())
    assert back == layout and back.n_heads == 0
    assert layout.summary(None)["heads"] is None


def test_a_remote_run_and_its_captures_see_the_publishers_layout() -> None:
    run = Run(small_encoder(EventDispatcher()), run_id="r")
    summary = run.model_summary()
    for site, layer in zip(run.sites, summary["layer_details"], strict=True):
        layer["qkv"] = site.qkv  # as the publisher announces it
    remote = RemoteRun("r", "r", summary, "host:1")
    # The announce carries each site's name, role, type, heads and QKV flag, and the
    # model's d_model (a site's own d_model stays with the publisher).
    assert remote.layout == dataclasses.replace(run.layout, sites=tuple(
        dataclasses.replace(s, d_model=None) for s in run.layout.sites))
    assert remote.model_summary() == run.model_summary()
    captures = model_info_from_message(model_info_message(run.layout, None))
    assert [(s.name, s.heads) for s in captures.sites] == [
        (s.name, s.heads) for s in run.layout.sites]
    assert (captures.vocab_size, captures.d_model) == (run.layout.vocab_size, 8)
