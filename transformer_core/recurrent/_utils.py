"""The ``state`` / deprecated ``memory`` keyword of the recurrent modules."""

from __future__ import annotations

import warnings
from typing import Any


def check_state(state: Any = None, memory: Any = None) -> Any:
    """``state``, or ``memory`` (its deprecated name, with a DeprecationWarning).

    >>> check_state([1, 2])
    [1, 2]
    """
    if memory is not None:
        warnings.warn(
            "'memory' is deprecated for recurrent transformers; pass 'state' instead",
            DeprecationWarning, stacklevel=3)
        if state is None:
            return memory
    return state
