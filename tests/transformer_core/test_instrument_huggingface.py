"""Hugging Face models on their default ``sdpa``: events equal the same weights' ``eager``
``output_attentions``; outputs bit-identical while nobody listens; ``generate`` watched."""

from __future__ import annotations

import copy

import pytest
import torch

from transformer_core.instrument import StaleEventError, instrument

transformers = pytest.importorskip("transformers")
# 4.x's T5 computes its attention by hand (no attention interface, no SDPA call).
T5_WATCHABLE = int(transformers.__version__.split(".")[0]) >= 5
needs_t5 = pytest.mark.skipif(not T5_WATCHABLE, reason="T5 on transformers 4.x is not watchable")


def _tiny(name: str) -> torch.nn.Module:
    """A random-weight model from a tiny config (no download), in eval mode."""
    common = dict(vocab_size=50)
    if name == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=32,
                                         bos_token_id=0, eos_token_id=1, **common)
        return transformers.GPT2LMHeadModel(config).eval()
    if name == "llama":  # grouped-query attention: 4 query heads share 2 key heads
        config = transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
            pad_token_id=2, **common)
        return transformers.LlamaForCausalLM(config).eval()
    if name == "gemma2":  # soft-capped logits, a sliding-window layer (window 3 < L)
        config = transformers.Gemma2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, sliding_window=3, attn_logit_softcapping=5.0,
            max_position_embeddings=64, pad_token_id=2, **common)
        return transformers.Gemma2ForCausalLM(config).eval()
    if name == "vit":
        config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=32,
                                        image_size=8, patch_size=4, num_channels=3)
        return transformers.ViTModel(config).eval()
    if name == "bert":
        config = transformers.BertConfig(hidden_size=16, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=32,
                                         max_position_embeddings=32, **common)
        return transformers.BertModel(config).eval()
    config = transformers.T5Config(d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                   num_decoder_layers=2, num_heads=2,
                                   decoder_start_token_id=0, **common)
    return transformers.T5ForConditionalGeneration(config).eval()


def _eager(model: torch.nn.Module) -> torch.nn.Module:
    """The same weights on the ``eager`` implementation (the reference)."""
    config = copy.deepcopy(model.config)
    config._attn_implementation = "eager"
    reference = type(model)(config).eval()
    reference.load_state_dict(model.state_dict())
    assert reference.config._attn_implementation == "eager"
    return reference


def _record(sites) -> list:
    seen = []
    for site in sites:
        site.dispatcher.listen(lambda ev: True, seen.append)
    return seen


def _inputs(name: str) -> dict:
    if name == "vit":
        return {"pixel_values": torch.randn(2, 3, 8, 8)}
    ids = torch.randint(3, 50, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    decoder = name in ("gpt2", "llama", "gemma2")
    mask[1, :2] = 0 if decoder else 1  # left padding for decoders
    mask[1, 4:] = 1 if decoder else 0  # right padding for encoders
    inputs = {"input_ids": ids, "attention_mask": mask}
    if name == "t5":
        inputs["decoder_input_ids"] = torch.randint(3, 50, (2, 4))
    return inputs


def _references(name: str, out) -> list[torch.Tensor]:
    """Eager attentions in the sites' (named_modules) order."""
    if name != "t5":
        return list(out.attentions)
    decoder = [m for pair in zip(out.decoder_attentions, out.cross_attentions, strict=True)
               for m in pair]
    return [*out.encoder_attentions, *decoder]


@pytest.mark.parametrize("name", ["gpt2", "llama", "gemma2", "bert", "vit",
                                  pytest.param("t5", marks=needs_t5)])
def test_events_equal_eager_output_attentions(name):
    model = _tiny(name)
    # Gemma2 soft-caps its logits, which sdpa cannot: it defaults to eager
    assert model.config._attn_implementation == ("eager" if name == "gemma2" else "sdpa")
    inputs = _inputs(name)
    with torch.no_grad():
        plain = model(**inputs)
    sites = instrument(model)
    # 4.x's BERT calls F.scaled_dot_product_attention itself: the SDPA adapter finds it
    assert {s.kind for s in sites} <= {"huggingface", "sdpa"}
    with torch.no_grad():  # nobody listening: the same kernels, the same bits
        unwatched = model(**inputs)
    assert torch.equal(unwatched[0], plain[0])
    seen = _record(sites)
    with torch.no_grad():
        watched = model(**inputs)
        reference = _eager(model)(**inputs, output_attentions=True)
    assert torch.equal(watched[0], plain[0])
    expected = _references(name, reference)
    assert len(seen) == len(sites) == len(expected)
    query_ok = inputs.get("attention_mask", torch.ones(2, 1)).bool()  # (N, L)
    for site, event, ref in zip(sites, seen, expected, strict=True):
        assert event.source is site.module and event.role == site.role
        assert event.shape == tuple(ref.shape)
        matrix = event.attention_matrix
        if ref.shape[-2] == query_ok.shape[1] and name in ("gpt2", "llama"):
            # eager spreads a padded query uniformly, sdpa (whose output this is) zeroes it
            rows = query_ok[:, None, :, None].expand_as(matrix)
            torch.testing.assert_close(matrix[rows], ref[rows], atol=1e-5, rtol=0)
            assert bool(matrix[~rows].eq(0).all())
        else:
            torch.testing.assert_close(matrix, ref, atol=1e-5, rtol=0)
    last, ref = seen[-1], expected[-1]  # a slice computed alone equals the full matrix's
    torch.testing.assert_close(last.attention(sample=0, heads=[1]), ref[0, [1]], atol=1e-5,
                               rtol=0)


@needs_t5
def test_site_names_roles_and_heads():
    t5 = instrument(_tiny("t5"))
    assert [(s.name, s.role) for s in t5][:4] == [
        ("encoder.block.0.layer.0.SelfAttention", "self"),
        ("encoder.block.1.layer.0.SelfAttention", "self"),
        ("decoder.block.0.layer.0.SelfAttention", "self"),
        ("decoder.block.0.layer.1.EncDecAttention", "cross")]
    llama = instrument(_tiny("llama"))
    assert [(s.name, s.heads, s.d_model) for s in llama] == [
        ("model.layers.0.self_attn", 4, 32), ("model.layers.1.self_attn", 4, 32)]


def test_instrument_twice_emits_once():
    model = _tiny("gpt2")
    instrument(model)
    seen = _record(instrument(model))
    with torch.no_grad():
        model(torch.randint(3, 50, (1, 5)))
    assert len(seen) == 2


def test_generate_while_watched_dynamic_cache():
    model = _tiny("gpt2")
    ids = torch.randint(3, 50, (1, 4))
    plain = model.generate(ids, max_new_tokens=3, do_sample=False)
    seen = _record(instrument(model))
    watched = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(watched, plain)
    # prompt pass (L=4) then one query per new token, keys growing with the cache
    assert [ev.shape[2:] for ev in seen[::2]] == [(4, 4), (1, 5), (1, 6)]
    last = seen[-1].attention_matrix  # (1, H, 1, 6): read after generate ended
    torch.testing.assert_close(last.sum(-1), torch.ones(1, 2, 1))


def test_generate_static_cache_late_read_is_detected():
    model = _tiny("llama")
    ids = torch.randint(3, 50, (1, 4))
    in_handler = []
    sites = instrument(model)
    seen = _record(sites)
    sites[0].dispatcher.listen(lambda ev: True,
                               lambda ev: in_handler.append(ev.attention(sample=0)))
    copies = []
    sites[0].dispatcher.listen(lambda ev: True, lambda ev: copies.append(ev.sample_copy(0)))
    model.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="static")
    first = seen[0]  # the prompt's layer-0 event; the static cache was written since
    with pytest.raises(StaleEventError, match="static key cache"):
        first.attention(sample=0)
    # read in the handler (a slice: not cached) or kept as a copy, it is the right matrix
    torch.testing.assert_close(copies[0].attention(sample=0), in_handler[0])
    assert in_handler[0].shape == (4, 4, 6)  # (H, L, S): S is the static cache's length


@pytest.mark.slow  # compiling takes seconds
# torch.compile imports code that uses torch.jit (deprecated) on its first use
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_gpt2_no_graph_break_without_listener():
    model = _tiny("gpt2")
    sites = instrument(model)
    ids = torch.randint(3, 50, (2, 6))
    assert torch._dynamo.explain(model)(ids).graph_break_count == 0
    seen = _record(sites)
    with torch.no_grad():
        torch.compile(model)(ids)
    assert [ev.source for ev in seen] == [s.module for s in sites]


def test_flash_style_call_rebuilds_padding_causal_and_window():
    from transformer_core.instrument.huggingface import hf_call

    module = torch.nn.Module()
    module.is_causal = True
    q, k = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 5, 4)  # 3 new queries, 5 cached keys
    padding = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])  # sample 1: left-padded
    call = hf_call(module, q, k, padding, {"sliding_window": 3}, "flash_attention_2")
    allowed = call.matrix(slice(None), slice(None)) > 0  # (N, H, L, S)
    # query i is token 2 + i: it sees keys 2+i-2 .. 2+i (window 3, causal bottom-right)
    expected = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1]]).bool()
    assert torch.equal(allowed[0, 0], expected)
    assert torch.equal(allowed[1, 1], expected & padding[1].bool())
