"""Feeding a model what a capture gives (token ids, text or features), whatever the model.

A Hugging Face model takes ``input_ids`` (with an ``attention_mask`` when sequences
are padded) or ``inputs_embeds``, by keyword; an encoder-decoder gets the same
tokens as its decoder input. Any other model takes the tensor positionally. Text
and token labels go through a Hugging Face tokenizer when the run has one.

Shape legend: N batch, L positions, d model width.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn


def is_huggingface(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers`` ``PreTrainedModel`` (checked without
    importing transformers)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def call_model(model: nn.Module, inputs: torch.Tensor,
               attention_mask: torch.Tensor | None = None) -> Any:
    """``model`` on token ids (N, L) long or features (N, L, d) float.

    >>> call_model(nn.Embedding(5, 2), torch.tensor([[1, 2]])).shape
    torch.Size([1, 2, 2])
    """
    if not is_huggingface(model):
        return model(inputs)
    tokens = not inputs.is_floating_point()
    kwargs: dict[str, Any] = {"input_ids" if tokens else "inputs_embeds": inputs}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if getattr(model.config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids" if tokens else "decoder_inputs_embeds"] = inputs
    return model(**kwargs)


def padding_mask(tokens: torch.Tensor, pad_id: int | None) -> torch.Tensor | None:
    """(N, L) 1 where a token is not padding, or None when no row holds ``pad_id``.

    >>> padding_mask(torch.tensor([[3, 4], [3, 0]]), 0).tolist()
    [[1, 1], [1, 0]]
    >>> padding_mask(torch.tensor([[3, 4]]), 0) is None
    True
    """
    if pad_id is None:
        return None
    mask = tokens.ne(pad_id)
    return None if bool(mask.all()) else mask.long()


def model_pad_id(model: nn.Module) -> int | None:
    """A Hugging Face model's ``config.pad_token_id`` (None for other models)."""
    if not is_huggingface(model):
        return None
    pad = model.config.pad_token_id
    return pad if isinstance(pad, int) else None


# A token label on the page and on the wire (the publish protocol's limit); longer ones
# (runs of spaces in code tokenizers) are cut with an ellipsis.
MAX_LABEL_CHARS = 64


def short_label(text: str) -> str:
    """``text`` cut to :data:`MAX_LABEL_CHARS` characters.

    >>> short_label("ab"), len(short_label("x" * 100))
    ('ab', 64)
    """
    return text if len(text) <= MAX_LABEL_CHARS else text[: MAX_LABEL_CHARS - 1] + "\u2026"


class TextTokenizer:
    """A Hugging Face tokenizer, as a run uses it: token labels and text -> ids.

    Labels are what the tokenizer decodes each id to (``" the"``, ``"\\n"``: byte-level
    BPE's ``"Ġthe"`` and ``"Ċ"`` never reach the page), cached per id so a step's labels
    cost a dictionary look-up per position after the first time.
    """

    def __init__(self, tokenizer: Any) -> None:
        if not callable(tokenizer) or not hasattr(tokenizer, "convert_ids_to_tokens"):
            raise TypeError("tokenizer must be a Hugging Face tokenizer (callable, with "
                            f"convert_ids_to_tokens), got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        self._labels: dict[int, str] = {}

    @property
    def pad_id(self) -> int | None:
        pad = self.tokenizer.pad_token_id
        return pad if isinstance(pad, int) else None

    def labels(self, ids: torch.Tensor) -> list[str]:
        """The strings of token ids (L,), as the text shows them (``" the"``, not ``"Ġthe"``)."""
        cache = self._labels
        out = []
        for i in ids.tolist():
            label = cache.get(i)
            if label is None:
                label = cache[i] = self._decode(i)
            out.append(label)
        return out

    def _decode(self, i: int) -> str:
        text = self.tokenizer.decode([i])
        return short_label(text if text else str(self.tokenizer.convert_ids_to_tokens(i)))

    def vocabulary(self) -> list[str]:
        """The label of every id, ``len(tokenizer)`` of them, decoded in one batch (what a
        remote run sends the server as its symbols)."""
        texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
        return [short_label(t) if t else self._decode(i) for i, t in enumerate(texts)]

    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids (N, L) of ``texts``, right-padded to one length, and their attention
        mask (N, L) (None when no row is padded)."""
        rows = [self.tokenizer(t)["input_ids"] for t in texts]
        length = max(len(r) for r in rows)
        pad = self.pad_id if self.pad_id is not None else 0
        ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows], dtype=torch.long)
        mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
        return ids, None if bool(mask.all()) else mask
