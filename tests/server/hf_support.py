"""A tiny GPT-2 and a byte-level BPE tokenizer trained here in milliseconds (no download):
what a new user builds to try attnscope with the ``transformers`` Trainer."""

from __future__ import annotations

import torch

CORPUS = ["the cat sat on the mat.\n", "the dog sat on the log.\n",
          "def add(a, b):\n    return a + b\n", "a cat and a dog\n"] * 50


def bpe_tokenizer():
    """A GPT-2-style byte-level BPE tokenizer (``Ġ`` marks a leading space, ``Ċ`` a newline),
    with ``<pad>`` as its pad token."""
    import transformers
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, min_frequency=1, special_tokens=["<pad>"])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer,
                                                pad_token="<pad>")


def tiny_gpt2(vocab_size: int, layers: int = 2, heads: int = 2, positions: int = 64):
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=layers, n_head=heads, n_embd=16,
                                     n_positions=positions, vocab_size=vocab_size,
                                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.GPT2LMHeadModel(config)
