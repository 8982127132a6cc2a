"""attnscope.show: one forward pass of any model kind attnscope watches, every layer and
head in a standalone page with the token strings; inline in a notebook, or as a file."""

from __future__ import annotations

import html
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import attnscope
from tests.look_support import (
    TEXT,
    Nano,
    TokenEncoder,
    bpe_tokenizer,
    core_encoder,
    embedded,
    gpt2,
    hf_tokenizer,
    matrices,
)

pytest.importorskip("transformers")


def eager_attentions(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """GPT-2's own attention weights (eager, output_attentions) for the same weights."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    config._attn_implementation = "eager"
    reference = type(model)(config).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        return [a[0] for a in reference(input_ids=ids, output_attentions=True).attentions]


def test_gpt2_with_a_bpe_tokenizer_shows_token_strings_and_its_own_weights(tmp_path):
    model, tok = gpt2(), hf_tokenizer()
    view = attnscope.show(model, tok, TEXT, path=tmp_path / "cat.html")
    data = embedded(view.html)
    labels = data["frames"][0]["labels"]
    assert labels["queries"] == labels["keys"] == ["The", " cat", " sat", " on", " the", " mat"]
    assert not any("Ġ" in t for t in labels["queries"])
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    got = matrices(data)
    for layer, ref in enumerate(eager_attentions(model, ids)):
        np.testing.assert_allclose(got[layer], ref.numpy(), atol=2e-3)
    assert data["model"] == {"layers": 2, "heads": 2,
                             "names": ["transformer.h.0.attn", "transformer.h.1.attn"]}
    assert data["title"] == TEXT and "GPT2LMHeadModel" in data["subtitle"]
    assert model.training  # restored after the eval-mode pass
    assert (tmp_path / "cat.html").read_text() == view.html


def test_a_raw_tokenizers_bpe_gives_the_same_tokens():
    model = gpt2()
    raw = embedded(attnscope.show(model, bpe_tokenizer(), TEXT).html)
    wrapped = embedded(attnscope.show(model, hf_tokenizer(), TEXT).html)
    assert raw["frames"] == wrapped["frames"]


def test_multibyte_text_keeps_its_characters():
    view = attnscope.show(gpt2(), hf_tokenizer(), "Über café")
    labels = embedded(view.html)["frames"][0]["labels"]["queries"]
    assert "".join(labels) == "Über café"


@pytest.mark.parametrize("make, kind", [(Nano, "sdpa"), (TokenEncoder, "mha")])
def test_token_models_of_other_kinds(make, kind):
    tok = hf_tokenizer()
    model = make()
    view = attnscope.show(model, tok, TEXT)
    data = embedded(view.html)
    layers = matrices(data)
    assert len(layers) == len(data["model"]["names"]) >= 2
    for m in layers.values():  # (H, 6, 6) softmax rows
        assert m.shape[1:] == (6, 6)
        np.testing.assert_allclose(m.astype(np.float32).sum(-1), 1.0, atol=5e-3)
    assert data["frames"][0]["labels"]["keys"][1] == " cat"
    if kind == "sdpa":  # causal: nothing above the diagonal
        assert np.triu(layers[0][0].astype(np.float32), 1).max() == 0


def test_features_and_token_ids_without_a_tokenizer():
    data = embedded(attnscope.show(core_encoder(), features=torch.randn(5, 8)).html)
    assert data["frames"][0]["shape"] == [2, 5, 5]
    assert data["frames"][0]["labels"] == {"queries": None, "keys": None}  # indices shown
    data = embedded(attnscope.show(Nano(), tokens=[5, 9, 7]).html)
    assert data["frames"][0]["labels"]["queries"] == ["5", "9", "7"]
    assert data["title"] == "3 tokens"


def test_options_reach_the_page():
    data = embedded(attnscope.show(gpt2(), hf_tokenizer(), TEXT, view="focus", focus=(1, 0),
                                   scale="log", layers=[1], kind="qk_logits").html)
    assert (data["view"], data["focus"], data["scale"], data["kind"]) == (
        "focus", {"layer": 1, "head": 0}, "log", "qk_logits")
    assert [f["layer"] for f in data["frames"]] == [1] and data["model"]["layers"] == 2
    assert data["roles"] is None and data["stats"] == []  # statistics are of weights


@pytest.mark.parametrize("kwargs, message", [
    ({"text": TEXT}, "text needs a tokenizer"),
    ({"tokens": [1, 2], "features": torch.zeros(2, 8)}, "exactly one of"),
    ({}, "exactly one of"),
    ({"tokens": [[1, 2], [3, 4]]}, "one sequence"),
    ({"tokens": [1, 2], "view": "table"}, "view: expected one of"),
])
def test_bad_inputs_say_what_to_give(kwargs, message):
    with pytest.raises(ValueError, match=message):
        attnscope.show(Nano(), **kwargs)


def test_the_notebook_display_is_the_page_in_an_iframe():
    view = attnscope.show(Nano(), hf_tokenizer(), TEXT)
    shown = view._repr_html_()
    srcdoc = re.search(r'srcdoc="([^"]*)"', shown).group(1)
    assert html.unescape(srcdoc) == view.html
    assert shown.startswith("<iframe") and "height: 640px" in shown
    assert repr(view) == "<attnscope view: Nano, 6 tokens, 2 layers x 4 heads>"


def test_import_attnscope_stays_light_and_offers_show():
    code = ("import sys, attnscope; light = 'attnscope.training.look' not in sys.modules "
            "and 'torch' not in sys.modules; f = attnscope.show; "
            "print(light, f.__module__, attnscope.show is f)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.split() == ["True", "attnscope.training.look", "True"]


def test_view_of_a_capture_taken_elsewhere():
    """What a run's export does: a capture (here of two samples) and its layout -> the page."""
    from attnscope.contract.layout import LocalModel
    from attnscope.core.capture import run_capture
    from attnscope.training.look import view_of

    model = Nano()
    tensors = run_capture(model, torch.tensor([[1, 2, 3], [4, 5, 6]]), ["attention"])
    view = view_of(LocalModel(model).layout, tensors, ["d", "e", "f"], title="second",
                   model_name="Nano", sample=1, view="map")
    data = embedded(view.html)
    np.testing.assert_allclose(matrices(data)[0], tensors["attention.0"][1].numpy(), atol=1e-3)
    assert data["view"] == "map" and data["frames"][0]["labels"]["keys"] == ["d", "e", "f"]
    with pytest.raises(ValueError, match="no qk_logits"):
        view_of(LocalModel(model).layout, tensors, None, title="", model_name="Nano",
                kind="qk_logits")
