"""Other people's models on the dashboard: Hugging Face GPT-2 (with a tokenizer), BERT,
a nanoGPT-style model and nn.TransformerEncoder start a dashboard, stream heatmaps,
and their REST captures equal independent references."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import torch.nn as nn
from captures_support import make_app, serve
from stream_support import connect, recv_frame, run_async

from attnscope import Dashboard
from attnscope.training.run import Run
from tests.look_support import Nano

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
WORDS = ["[PAD]", "[UNK]", "the", "cat", "sat", "on", "a", "mat", "dog", "ran", "to", "big",
         "red"]


def tokenizer():
    """A word-level Hugging Face tokenizer built here (no download); [PAD] is id 0."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]",
                                                unk_token="[UNK]")


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=32,
                                     vocab_size=len(WORDS), bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def eager_attentions(model: nn.Module, **inputs) -> list[torch.Tensor]:
    """The same weights on ``eager`` with ``output_attentions=True``: (N, H, L, S) per layer."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    config._attn_implementation = "eager"
    reference = type(model)(config).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        return list(reference(**inputs, output_attentions=True).attentions)


def capture(url: str, body: dict) -> tuple[dict, dict[str, np.ndarray]]:
    created = httpx.post(url + "/api/v1/captures", json=body, timeout=60)
    assert created.status_code == 201, created.text
    meta = created.json()
    data = httpx.get(url + meta["urls"]["npz"], timeout=60).content
    with np.load(io.BytesIO(data)) as npz:
        return meta, {k: npz[k] for k in npz.files}


def ended_run(model: nn.Module, **kwargs) -> Run:
    run = Run(model, run_id="r", **kwargs)
    run.close()  # no training thread: captures run inline
    return run


def test_gpt2_text_capture_with_tokenizer_equals_eager(tmp_path):
    model, tok = gpt2(), tokenizer()
    run = ended_run(model, tokenizer=tok)
    assert [(s.name, s.kind, s.heads) for s in run.layout.sites] == [
        ("transformer.h.0.attn", "huggingface", 2), ("transformer.h.1.attn", "huggingface", 2)]
    texts = ["the cat sat on a mat", "a dog ran"]
    with serve(make_app(tmp_path, runs=[run])) as url:
        meta, arrays = capture(url, {"run": "r", "text": texts, "kinds": ["attention"]})
    enc = tok(texts, padding=True, return_tensors="pt")
    expected = eager_attentions(model, **enc)
    assert meta["labels"] == [["the", "cat", "sat", "on", "a", "mat"],
                              ["a", "dog", "ran", "[PAD]", "[PAD]", "[PAD]"]]
    assert arrays["tokens"].tolist() == enc["input_ids"].tolist()
    for i, ref in enumerate(expected):
        np.testing.assert_allclose(arrays[f"attention.{i}"], ref.numpy(), atol=1e-5)
    # the padded sample's valid queries never look at its padding
    assert np.abs(arrays["attention.0"][1, :, :3, 3:]).max() == 0


def test_bert_padded_tokens_capture_masks_padding(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=32, pad_token_id=0)
    model = transformers.BertModel(config).eval()
    tokens = [[2, 3, 4, 5], [6, 7, 0, 0]]  # the model's pad_token_id pads sample 1
    with serve(make_app(tmp_path, runs=[ended_run(model)])) as url:
        _, arrays = capture(url, {"run": "r", "tokens": tokens, "kinds": ["attention"]})
    ids = torch.tensor(tokens)
    expected = eager_attentions(model, input_ids=ids, attention_mask=ids.ne(0).long())
    for i, ref in enumerate(expected):
        np.testing.assert_allclose(arrays[f"attention.{i}"], ref.numpy(), atol=1e-5)
    assert np.abs(arrays["attention.1"][1, :, :, 2:]).max() == 0


def test_nanogpt_tokens_capture_equals_plain_softmax(tmp_path):
    torch.manual_seed(0)
    model = Nano().eval()
    tokens = [[1, 2, 3, 4, 5], [5, 4, 3, 2, 1]]
    with serve(make_app(tmp_path, runs=[ended_run(model)])) as url:
        _, arrays = capture(url, {"run": "r", "tokens": tokens, "kinds": ["attention"]})
    with torch.no_grad():
        q, k, _ = model.attn[0].qk(model.wte(torch.tensor(tokens)))
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (N, H, L, S)
        causal = torch.ones(5, 5, dtype=torch.bool).tril()
        ref = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    np.testing.assert_allclose(arrays["attention.0"], ref.numpy(), atol=1e-5)


def test_transformer_encoder_features_capture_equals_need_weights(tmp_path):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    run = ended_run(model)
    assert run.layout.vocab_size is None and run.layout.d_model == 8  # reads features
    x = torch.randn(2, 4, 8)
    with serve(make_app(tmp_path, runs=[run])) as url:
        _, arrays = capture(url, {"run": "r", "features": x.tolist(), "kinds": ["attention"]})
    with torch.no_grad():
        _, ref = model.layers[0].self_attn(x, x, x, average_attn_weights=False)
    np.testing.assert_allclose(arrays["attention.0"], ref.numpy(), atol=1e-5)


def test_gpt2_dashboard_streams_heatmaps_with_token_strings():
    model, tok = gpt2(), tokenizer()
    ids = tok(["the big red cat sat"], return_tensors="pt")["input_ids"]
    with Dashboard.start(model, port=0, name="gpt2", quiet=True, tokenizer=tok) as dash:
        [summary] = httpx.get(dash.url + "/api/v1/runs").json()
        assert [d["name"] for d in summary["model"]["layer_details"]] == [
            "transformer.h.0.attn", "transformer.h.1.attn"]

        async def watch():
            ws = await connect(dash.url.replace("http", "ws") + "/ws")
            await ws.send(json.dumps({"type": "subscribe", "run": "gpt2",
                                      "kinds": ["attention"], "layers": [1]}))
            for step in range(200):
                with torch.no_grad():
                    model(input_ids=ids)
                dash.step(step, loss=1.0, tokens=ids)
                try:
                    header, array = await recv_frame(ws, "attention", timeout=0.02)
                    break
                except TimeoutError:
                    continue
            await ws.close()
            return header, array

        header, array = run_async(watch)
    assert header["labels"]["queries"] == ["the", "big", "red", "cat", "sat"]
    assert np.asarray(array).shape[-2:] == (5, 5)


@pytest.mark.parametrize("script", ["train_gpt2.py", "train_nanogpt.py"])
def test_examples_train_with_the_dashboard(script):
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--steps", "3",
                           "--port", "0"], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "attnscope dashboard: http://127.0.0.1:" in done.stdout


def test_dashboard_keeps_the_encoder_fast_path():
    from torch.profiler import profile

    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 4, 8)
    with torch.no_grad():
        plain = model(x)
    with Dashboard.start(model, port=0, quiet=True) as dash:
        with torch.no_grad(), profile() as prof:
            watched = model(x)
        dash.step(0, loss=1.0)
    assert "aten::_transformer_encoder_layer_fwd" in {e.key for e in prof.key_averages()}
    assert torch.equal(watched, plain)
