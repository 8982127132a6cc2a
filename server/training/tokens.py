"""What ``step(tokens=...)`` accepts, checked where it is given, with errors that say what
was passed and what to pass instead (training side: runs in the training thread, cheap).

Accepted: an (N, L) integer tensor (or numpy array) of token ids, a list of N lists of
L ids or of L strings, and a Hugging Face ``BatchEncoding`` or any mapping holding
``input_ids`` (its ids are used). Refused by name: a flat list of strings, a (L,)
tensor, float tensors, a mapping without ``input_ids``.

>>> ids, n, length = token_rows({"input_ids": [[5, 6, 7]], "attention_mask": [[1, 1, 1]]})
>>> ids.tolist(), n, length
([[5, 6, 7]], 1, 3)
>>> token_rows(["the", "cat"])  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
TypeError: tokens: got a list of 2 strings; give one list of labels per sample ...
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch

_EXPECTED = "an (N, L) tensor of token ids or a list of N lists of L labels"
# Owners already warned, per kind of warning (each is said once per dashboard or run).
_warned: dict[str, weakref.WeakSet] = {}


def token_rows(tokens: Any) -> tuple[Any, int, int]:
    """``tokens`` as (an (N, L) integer tensor, on its device, or a list of N lists of L
    strings, N, L);
    ``TypeError`` / ``ValueError`` naming what was given otherwise. O(N) checks only."""
    if isinstance(tokens, Mapping):
        if "input_ids" not in tokens:
            raise TypeError(f"tokens: got a {type(tokens).__name__} with keys "
                            f"{sorted(map(str, tokens))[:8]}; give its input_ids, or {_EXPECTED}")
        tokens = tokens["input_ids"]
    if not isinstance(tokens, torch.Tensor) and hasattr(tokens, "__array_interface__"):
        tokens = torch.as_tensor(tokens)  # numpy
    if isinstance(tokens, torch.Tensor):
        return _tensor_rows(tokens)
    if isinstance(tokens, str | bytes) or not isinstance(tokens, Sequence):
        raise TypeError(f"tokens: got {type(tokens).__name__}; give {_EXPECTED}")
    if not tokens:
        raise ValueError(f"tokens: got an empty list; give {_EXPECTED}")
    first = tokens[0]
    if isinstance(first, str):
        raise TypeError(f"tokens: got a list of {len(tokens)} strings; give one list of labels "
                        'per sample ([["the", ...]] for one sequence), or an (N, L) tensor of '
                        "token ids")
    if isinstance(first, torch.Tensor) or not isinstance(first, Sequence) or not first:
        raise TypeError(f"tokens: got a list of {type(first).__name__}; give {_EXPECTED}")
    length = len(first)
    for i, row in enumerate(tokens):
        if isinstance(row, str) or not isinstance(row, Sequence) or len(row) != length:
            raise ValueError(f"tokens: sample {i} has {_length(row)} labels, sample 0 has "
                             f"{length}; give L labels for every sample")
    if isinstance(first[0], int) and not isinstance(first[0], bool):
        return _tensor_rows(torch.tensor(tokens, dtype=torch.long))
    if not isinstance(first[0], str):
        raise TypeError(f"tokens: labels must be strings or integer token ids, got "
                        f"{type(first[0]).__name__}")
    return tokens, len(tokens), length


def _length(row: Any) -> str:
    return str(len(row)) if isinstance(row, Sequence) and not isinstance(row, str) else "no"


def _tensor_rows(tokens: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    if tokens.ndim == 1:
        raise ValueError(f"tokens: a tensor of shape {tuple(tokens.shape)}; give (N, L), "
                         "e.g. tokens.unsqueeze(0) for one sequence")
    if tokens.ndim != 2:
        raise ValueError(f"tokens: expected shape (N, L), got {tuple(tokens.shape)}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"tokens: a tensor of {tokens.dtype}; token ids are integers")
    # Kept where it is: a GPU batch is read (one copy) only when its labels are shown,
    # never at every step.
    return tokens.detach(), tokens.shape[0], tokens.shape[1]


def check_batch(owner: object, length: int, seq_len: int | None, first: bool) -> bool:
    """Tokens of ``length`` positions against the batch the model's attention saw (when
    known): True when they fit. A mismatch on the ``first`` tokens given raises (the
    mistake shows at once); later ones warn once and are not kept, so a stray batch
    (a micro-batch padded to another length) never stops a long run.

    >>> check_batch(object(), 10, 64, first=True)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: tokens: 10 labels per sample, but the model's attention saw 64 positions...
    """
    if seq_len is None or length == seq_len:
        return True
    message = (f"tokens: {length} labels per sample, but the model's attention saw {seq_len} "
               "positions; give one label per position of each sample")
    if first:
        raise ValueError(message)
    _warn_once("labels", owner, message + " (these labels are not shown)")
    return False


def warn_labels_mismatch(owner: object, labels: int, positions: int) -> None:
    """Once per ``owner``: token labels given to ``step()`` that do not fit the attention
    (the page then shows position numbers)."""
    _warn_once("labels", owner,
               f"tokens: {labels} labels per sample, but the attention has {positions} "
               "positions; the page shows position numbers (give one label per position)")


def warn_step_after_close(owner: object) -> None:
    """Once per ``owner``: ``step()`` after ``close()`` does nothing."""
    _warn_once("closed", owner,
               f"{type(owner).__name__}.step() after close(): ignored, the run has ended "
               "(start a new dashboard to keep watching)", stacklevel=4)


def _warn_once(kind: str, owner: object, message: str, stacklevel: int = 3) -> None:
    warned = _warned.setdefault(kind, weakref.WeakSet())
    try:
        if owner in warned:
            return
        warned.add(owner)
    except TypeError:  # not weak-referenceable: warn every time rather than never
        pass
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)
