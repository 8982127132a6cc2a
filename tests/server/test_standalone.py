"""Standalone files (attnscope.core.standalone): one .html that holds its data, plotly.js and the
page's scripts, no address to fetch; bounded in size by pooling, with a note, or an error."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from attnscope.core import standalone
from attnscope.core.assets import plotly_js_path
from attnscope.core.bundle import BundleError, bundle
from tests.look_support import embedded, matrices


def causal(h: int, length: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    logits = torch.randn(h, length, length).masked_fill(
        ~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(logits, -1)  # (H, L, L)


def test_the_file_is_self_contained(tmp_path):
    layers = {0: causal(3, 5), 1: causal(3, 5, 1)}
    path = standalone.write_html(tmp_path / "v.html", layers, list("abcde"), title="five")
    page = path.read_text()
    plotly = plotly_js_path().read_text()
    assert plotly[:2000] in page  # plotly.js inlined, from the installed package
    # nothing to fetch: no src=, no href= but the empty icon, no http(s) address in our markup
    markup = page.replace(plotly, "")
    assert not re.search(r'<script[^>]*\ssrc=', markup)
    assert re.findall(r'href="([^"]*)"', markup) == ["data:,"]
    assert "cdn" not in markup.lower()
    data = embedded(page)
    got = matrices(data)
    for i, m in layers.items():
        np.testing.assert_allclose(got[i], m.numpy(), atol=1e-3)  # float16
    assert data["notes"] == [] and data["frames"][0]["pool"] == 1


def test_a_long_input_is_pooled_under_the_limit_with_a_note():
    p = causal(2, 600)
    data = standalone.page_data({0: p}, [f"t{i}" for i in range(600)])
    assert data["frames"][0]["shape"] == [2, 300, 300]  # at most MAX_SIDE = 512 a side
    assert data["frames"][0]["labels"]["queries"][:2] == ["t0…t1", "t2…t3"]
    small = standalone.page_data({0: p, 1: p}, max_bytes=200_000)
    frame = small["frames"][0]
    size = sum(len(f["data"]) for f in small["frames"])
    assert size <= 200_000 and frame["pool"] > 2
    assert "pooled" in small["notes"][0] and "600 tokens" in small["notes"][0]
    # statistics are of the whole matrices: pooling does not change them
    assert small["stats"] == data["stats"] + [{**data["stats"][0], "layer": 1}]


def test_over_the_limit_even_pooled_is_an_error():
    with pytest.raises(standalone.StandaloneTooLarge, match="over the limit of 1000"):
        standalone.page_data({i: causal(4, 64) for i in range(4)}, max_bytes=1000)


def test_labels_of_another_length_leave_that_axis_to_indices():
    cross = torch.softmax(torch.randn(2, 3, 5), -1)  # (H, L=3, S=5): cross-attention
    data = standalone.page_data({0: cross}, (["q0", "q1", "q2"], list("abcde")))
    assert data["frames"][0]["labels"] == {"queries": ["q0", "q1", "q2"], "keys": list("abcde")}
    data = standalone.page_data({0: cross}, list("abcde"))
    assert data["frames"][0]["labels"] == {"queries": None, "keys": list("abcde")}


@pytest.mark.parametrize("option, value", [("kind", "qkv"), ("view", "grid"), ("scale", "lin")])
def test_unknown_options_are_named(option, value):
    with pytest.raises(ValueError, match=f"{option}: expected one of"):
        standalone.page_data({0: causal(1, 2)}, **{option: value})


def test_text_that_looks_like_markup_stays_data():
    data = standalone.page_data({0: causal(1, 2)}, ["</script><b>", "<!--"], title="</script>")
    page = standalone.render(data)
    assert embedded(page)["frames"][0]["labels"]["keys"] == ["</script><b>", "<!--"]
    assert page.count("</script>") == standalone.shell().count("</script>") + 1


def test_the_bundler_names_a_form_it_cannot_read():
    sources = {"main.js": 'import "./side.js";\nexport default 3;'}
    with pytest.raises(BundleError, match=r"main.js: line 1: unsupported import form"):
        bundle("main.js", sources.__getitem__)
    shell = standalone.shell()
    for module in ("grid.js", "headmap.js", "focus.js", "colormap.js", "standalone.js"):
        assert f'modules["{module}"]' in shell  # the page's own modules, bundled


def test_the_stated_limit_holds_twelve_by_twelve_heads_at_140_tokens():
    heads = torch.full((12, 140, 140), 1 / 140)
    data = standalone.page_data(dict.fromkeys(range(12), heads))
    assert {f["pool"] for f in data["frames"]} == {1}
    assert sum(len(f["data"]) for f in data["frames"]) <= standalone.MAX_DATA_BYTES
    longer = standalone.page_data(dict.fromkeys(range(12), torch.full((12, 150, 150), 1 / 150)))
    assert longer["frames"][0]["pool"] == 2
