"""Weight mappers: other implementations' weights give our encoder the same outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from transformer_core.attention import AttentionLayer, FullAttention
from transformer_core.transformers import TransformerEncoder, TransformerEncoderLayer
from transformer_core.weight_mapper import (
    HugginfaceBertEncoderMapper,
    IdentityRule,
    LongformerMapper,
    NotRule,
    OrRule,
    PytorchMapper,
    RegexRule,
    SimpleMapper,
)

try:
    from transformers import BertConfig, BertModel
except ImportError:  # the test extra installs it; a bare install skips the BERT test
    BertConfig = BertModel = None

D_MODEL, HEADS, D_FF = 32, 4, 64


def our_encoder(n_layers: int, activation: str = "relu", final_norm: bool = False):
    return TransformerEncoder([
        TransformerEncoderLayer(AttentionLayer(FullAttention(), D_MODEL, HEADS), D_MODEL, D_FF,
                                activation=activation)
        for _ in range(n_layers)
    ], nn.LayerNorm(D_MODEL) if final_norm else None).eval()


@pytest.mark.parametrize("activation, final_norm", [("relu", False), ("gelu", True)])
def test_pytorch_encoder_weights_give_the_same_outputs(activation, final_norm):
    theirs = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(D_MODEL, HEADS, D_FF, activation=activation,
                                   batch_first=True),
        3, norm=nn.LayerNorm(D_MODEL) if final_norm else None,
    ).eval()
    ours = our_encoder(3, activation, final_norm)
    with pytest.raises(RuntimeError):
        ours.load_state_dict(theirs.state_dict())
    ours.load_state_dict(PytorchMapper().map(theirs.state_dict()))
    x = torch.randn(4, 11, D_MODEL)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() < 1e-5


def test_pytorch_mapper_renames_separate_projections_of_multihead_attention():
    mha = nn.MultiheadAttention(D_MODEL, HEADS, kdim=16, vdim=16)
    mapped = PytorchMapper().map({f"layers.0.self_attn.{k}": v
                                  for k, v in mha.state_dict().items()})
    assert torch.equal(mapped["layers.0.attention.key_projection.weight"], mha.k_proj_weight)
    assert torch.equal(mapped["layers.0.attention.query_projection.bias"],
                       mha.in_proj_bias[:D_MODEL])
    assert "layers.0.attention.out_projection.weight" in mapped


@pytest.mark.skipif(BertModel is None, reason="transformers is not installed")
def test_hugging_face_bert_encoder_weights_give_the_same_outputs():
    config = BertConfig(hidden_size=D_MODEL, num_hidden_layers=2, num_attention_heads=HEADS,
                        intermediate_size=D_FF, hidden_act="gelu", layer_norm_eps=1e-5)
    bert = BertModel(config).eval()
    ours = our_encoder(2, "gelu")
    x = torch.randn(3, 10, D_MODEL)
    with torch.no_grad():
        assert (bert.encoder(x)[0] - ours(x)).abs().max() > 0.1  # different weights so far
        ours.load_state_dict(HugginfaceBertEncoderMapper().map(bert.encoder.state_dict()))
        assert (bert.encoder(x)[0] - ours(x)).abs().max() < 1e-5


@pytest.mark.skipif(BertModel is None, reason="transformers is not installed")
def test_bert_default_layer_norm_epsilon_still_agrees_closely():
    """BERT's LayerNorm epsilon (1e-12) is not ours (1e-5): the mapping stays close."""
    config = BertConfig(hidden_size=D_MODEL, num_hidden_layers=2, num_attention_heads=HEADS,
                        intermediate_size=D_FF)
    bert = BertModel(config).eval()
    ours = our_encoder(2, "gelu")
    ours.load_state_dict(HugginfaceBertEncoderMapper().map(bert.encoder.state_dict()))
    x = torch.randn(3, 10, D_MODEL)
    with torch.no_grad():
        assert (bert.encoder(x)[0] - ours(x)).abs().max() < 1e-4


def test_first_matching_rule_wins_and_unmatched_keys_are_dropped_without_identity():
    mapper = SimpleMapper([RegexRule("^a", "x"), RegexRule("a", "y")], add_identity=False)
    assert mapper.map({"ab": 1, "ba": 2, "c": 3}) == {"xb": 1, "by": 2}
    assert SimpleMapper([RegexRule("^a", "x")]).map({"ab": 1, "c": 3}) == {"xb": 1, "c": 3}


def test_not_rule_drops_what_it_negates_and_or_rule_chains():
    keep = SimpleMapper([NotRule(RegexRule(r"_global\.", ""))], add_identity=False)
    assert keep.map({"q_global.w": 1, "q.w": 2}) == {"q.w": 2}
    chain = OrRule(RegexRule("^layer", "layers"), RegexRule(r"\.w$", ".weight"))
    assert chain.apply("layer.0.w", 5) == [("layers.0.weight", 5)]
    assert chain.matches("x.w") and not chain.matches("x.b")
    assert IdentityRule().apply("k", 1) == [("k", 1)]


def test_longformer_mapper_drops_global_projections():
    state = {"layer.0.attention.self.query.weight": 1,
             "layer.0.attention.self.query_global.weight": 2}
    assert LongformerMapper().map(state) == {"layers.0.attention.query_projection.weight": 1}


def test_load_file_maps_a_saved_state_dict_and_a_checkpoint_entry(tmp_path):
    theirs = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(D_MODEL, HEADS, D_FF, batch_first=True), 1,
        enable_nested_tensor=False)
    torch.save(theirs.state_dict(), tmp_path / "plain.pt")
    torch.save({"model": theirs.state_dict(), "step": 7}, tmp_path / "checkpoint.pt")
    ours = our_encoder(1)
    ours.load_state_dict(PytorchMapper.load_file(tmp_path / "plain.pt"))
    checkpoint = PytorchMapper.load_file(tmp_path / "checkpoint.pt", model_root="model")
    assert checkpoint["step"] == 7
    ours.load_state_dict(checkpoint["model"])
    with pytest.raises(ValueError, match="model_root"):
        PytorchMapper.load_file(tmp_path / "checkpoint.pt", model_root="net")
