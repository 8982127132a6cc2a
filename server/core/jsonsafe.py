"""JSON has no NaN or Infinity: the one conversion of non-finite floats to null.

>>> json_safe({"loss": float("nan"), "rows": [1.0, float("inf")], "n": 3})
{'loss': None, 'rows': [1.0, None], 'n': 3}
"""

from __future__ import annotations

import math
from typing import Any


def finite_or_none(value: float) -> float | None:
    """``value``, or None when it is NaN or infinite."""
    return value if math.isfinite(value) else None


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (in dicts, lists, tuples) replaced by None."""
    if isinstance(value, float):
        return finite_or_none(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
