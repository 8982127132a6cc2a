"""Toy text for the examples, made here (no download): generated sentences ("the cat sat on
the mat.") and a byte-level BPE tokenizer trained on them in milliseconds (GPT-2's kind:
its tokens read "Ġcat" and "Ċ" inside; the page shows " cat" and a newline)."""

from __future__ import annotations

import random

import transformers
from tokenizers import ByteLevelBPETokenizer

SUBJECTS = ["the cat", "a dog", "the bird", "my friend", "the old man", "a small child"]
VERBS = ["sat on", "looked at", "walked to", "found", "jumped over", "talked to"]
OBJECTS = ["the mat", "a tree", "the house", "the river", "a red box", "the garden"]


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` sentences, each ending in a full stop and a newline."""
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}.\n"
            for _ in range(n)]


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A 400-token byte-level BPE trained on 2000 sentences, ``<pad>`` its pad token."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(sentences(2000), vocab_size=400, min_frequency=1,
                            special_tokens=["<pad>"])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer,
                                                pad_token="<pad>")
