"""Building the lazy AttentionEvent of attentions whose matrix is not a plain softmax."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..events import AttentionEvent

SliceFn = Callable[[Any, Any], torch.Tensor]


def lazy_event(source, shape: tuple[int, int, int, int], matrix_fn: SliceFn,
               logits_fn: SliceFn | None = None, **extra: Any) -> AttentionEvent:
    """An AttentionEvent of ``source`` whose (n, h, L, S) slices come from ``matrix_fn``.

    Without ``logits_fn`` the logits are ``log(matrix)``: their softmax is the
    matrix again (its rows sum to 1) and excluded keys are ``-inf``.
    """
    if logits_fn is None:
        def logits_fn(n, h):
            return matrix_fn(n, h).log()

    return AttentionEvent(source, shape, logits_fn, matrix_fn, role=source.role,
                          attention_type=source.attention_type, **extra)
