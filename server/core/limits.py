"""Checks that keep client input cheap and storable: index lists, numbers and response
sizes, in one place.

Every route and message that takes a list of layer or head indices passes it
through :func:`check_indices`; every integer that is stored or compared (steps,
offsets) through :func:`check_int64` and every float through :func:`check_finite`
(query parameters and request bodies by the :data:`Int64` and :data:`Finite`
types); every response that could be large has its size computed with
:func:`check_size` before anything is built. All raise :class:`LimitError`, which
names the field at fault; routers turn it into a 422 (REST) or an ``error``
message (websockets).

>>> check_indices("heads", [2, 0], 4)
(2, 0)
>>> try:
...     check_indices("heads", [0, 0], 4)
... except LimitError as exc:
...     exc.field, exc.message
('heads', 'head 0 is listed twice; list each head once')
>>> try:
...     check_int64("step", 2**70)
... except LimitError as exc:
...     exc.field, exc.message
('step', 'expected an integer in [-2**63, 2**63 - 1], got 1180591620717411303424')
>>> try:
...     check_size("heads", 10, 4, 4, limit=100)
... except LimitError as exc:
...     exc.field, exc.message[:44]
('heads', 'the response would hold 640 bytes, over this')
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Annotated, Any

from pydantic import AfterValidator
from pydantic_core import PydanticCustomError

# SQLite INTEGER and numpy int64: steps and offsets beyond this cannot be stored or compared.
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

_SINGULAR = {"heads": "head", "layers": "layer"}


class LimitError(ValueError):
    """Client input over a limit or malformed; ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def check_indices(field: str, values: Iterable[int], size: int, *, where: str = "") -> tuple[
        int, ...]:
    """``values`` as a tuple, in the order given, after checking each is in ``[0, size)``
    and listed once (so a list is never longer than ``size``).

    ``field`` ("heads", "layers") names the list in errors; ``where`` says whose
    size ``size`` is (e.g. "layer 2 of run 'demo'"). Stops at the first bad value,
    so the cost is bounded by ``size`` whatever the length of ``values``.
    """
    noun = _SINGULAR.get(field, "index")
    owner = f"{where or 'there'} {'has' if where else 'are'} {size} {field}"
    seen: set[int] = set()
    out: list[int] = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int):
            raise LimitError(field, f"{noun} {value!r} is not an integer")
        if not 0 <= value < size:
            span = f" (0-{size - 1})" if size else ""
            raise LimitError(field, f"{noun} {value} out of range: {owner}{span}")
        if value in seen:
            raise LimitError(field, f"{noun} {value} is listed twice; list each {noun} once")
        seen.add(value)
        out.append(value)
    return tuple(out)


def parse_index_list(field: str, text: str, size: int, *, where: str = "") -> tuple[int, ...]:
    """A comma-separated query parameter (``"0,3,1"``) through :func:`check_indices`.

    At most ``size`` items are parsed: a longer list is refused before it is split.

    >>> parse_index_list("heads", "1, 0", 2)
    (1, 0)
    """
    if text.count(",") >= max(size, 1):
        raise LimitError(field, f"{text.count(',') + 1} items, but there are only {size}")
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part.lstrip("-").isdigit() or len(part) > 20:
            raise LimitError(field, f"expected comma-separated integers, got {part[:24]!r}")
        values.append(int(part))
    return check_indices(field, values, size, where=where)


def check_int64(field: str, value: Any) -> int:
    """``value`` if it is an integer int64 holds (a bool is not an integer here)."""
    if isinstance(value, bool) or not isinstance(value, int) or \
            not INT64_MIN <= value <= INT64_MAX:
        raise LimitError(field, f"expected an integer in [-2**63, 2**63 - 1], got "
                                f"{str(value)[:40]}")
    return value


def check_finite(field: str, value: Any) -> float:
    """``value`` as a float if it is a finite number: JSON has no NaN or Infinity, yet
    Python's parser reads ``NaN`` and ``1e999`` (inf) into floats.

    >>> check_finite("time", 2)
    2.0
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or \
            (isinstance(value, float) and not math.isfinite(value)):
        raise LimitError(field, f"expected a finite number, got {str(value)[:40]}")
    if isinstance(value, int):
        check_int64(field, value)
    return float(value)


def check_numbers(field: str, value: Any) -> Any:
    """``value`` (parsed JSON) after checking that every number in it is an int64 integer
    or a finite float; errors name the path (``meta.sizes.2``).

    >>> check_numbers("meta", {"a": [1, 2.5, None, "x"]})
    {'a': [1, 2.5, None, 'x']}
    """
    if isinstance(value, dict):
        for key, item in value.items():
            check_numbers(f"{field}.{key}", item)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            check_numbers(f"{field}.{i}", item)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        check_finite(field, value)
    return value


def _pydantic(check: Any) -> AfterValidator:
    """``check`` as a pydantic validator: a 422 (REST) at the field's location."""
    def validate(value: Any) -> Any:
        try:
            return check("value", value)
        except LimitError as exc:
            raise PydanticCustomError("limit", exc.message) from None
    return AfterValidator(validate)


# The same checks for query parameters and request models:
# ``step: Annotated[Int64 | None, Query()]``, ``values: list[Finite]``.
Int64 = Annotated[int, _pydantic(check_int64)]
Finite = Annotated[float, _pydantic(check_finite)]


def check_size(field: str, *dims: int, limit: int, itemsize: int = 4) -> int:
    """The size in bytes of an array of shape ``dims``; raises when over ``limit``."""
    total = math.prod(dims) * itemsize
    if total > limit:
        raise LimitError(field, f"the response would hold {total} bytes, over this server's "
                                f"limit of {limit} bytes; ask for less (fewer heads, layers or "
                                "steps)")
    return total
