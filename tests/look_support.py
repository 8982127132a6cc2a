"""Tiny models of every kind attnscope watches, a byte-level BPE tokenizer trained on the
spot (no download), and readers of a standalone page's data, for the tests of
``attnscope.show`` and standalone files."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CORPUS = ["The cat sat on the mat.", "The dog sat on the log.", "A cat and a dog ran.",
          "Über café naïve résumé"] * 20
TEXT = "The cat sat on the mat"


def bpe_tokenizer():
    """A ``tokenizers`` byte-level BPE (GPT-2's kind: "Ġcat" inside) trained on CORPUS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def hf_tokenizer():
    """The BPE as a Hugging Face tokenizer, as a user loads one."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=bpe_tokenizer(), eos_token="<|endoftext|>")


def gpt2(vocab_size: int = 300) -> nn.Module:
    """GPT2Config(n_layer=2, n_head=2, n_embd=32), random weights, in training mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=vocab_size,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # peaked heads: the random init's are all near uniform
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(8)
    return model


class NanoAttention(nn.Module):
    """nanoGPT's attention: one F.scaled_dot_product_attention call."""

    def __init__(self, d: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.n_head = heads
        self.c_attn = nn.Linear(d, 3 * d)

    def qk(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        return tuple(t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                     for t in (q, k, v))  # (B, nh, T, hs)

    def forward(self, x):
        q, k, v = self.qk(x)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.transpose(1, 2).reshape(x.shape)


class Nano(nn.Module):
    """Token ids (N, L) -> (N, L, 16) through two SDPA layers."""

    def __init__(self, vocab_size: int = 300) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wte = nn.Embedding(vocab_size, 16)
        self.attn = nn.ModuleList(NanoAttention() for _ in range(2))

    def forward(self, idx):
        x = self.wte(idx)
        for attn in self.attn:
            x = x + attn(x)
        return x


class TokenEncoder(nn.Module):
    """Token ids (N, L) -> nn.TransformerEncoder (nn.MultiheadAttention inside)."""

    def __init__(self, vocab_size: int = 300) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab_size, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)

    def forward(self, idx):
        return self.encoder(self.embed(idx))


def core_encoder() -> nn.Module:
    """A transformer_core encoder (features (N, L, 8)), 2 layers x 2 heads."""
    from transformer_core.builders import TransformerEncoderBuilder

    torch.manual_seed(0)
    return TransformerEncoderBuilder.from_kwargs(
        n_layers=2, n_heads=2, query_dimensions=4, value_dimensions=4,
        feed_forward_dimensions=16).get()


def embedded(page: str) -> dict:
    """The data a standalone page carries."""
    found = re.search(r'<script type="application/json" id="attnscope-data">(.*?)</script>', page,
                      re.S)
    assert found, "no data element in the page"
    return json.loads(found.group(1))


def matrices(data: dict) -> dict[int, np.ndarray]:
    """Each frame's (H, L, S) values, decoded as the page decodes them."""
    out = {}
    for f in data["frames"]:
        assert f["dtype"] == "float16"
        out[f["layer"]] = np.frombuffer(base64.b64decode(f["data"]), "<f2").reshape(f["shape"])
    return out
