"""Checks that keep client input cheap: index lists and response sizes, in one place.

Every route and message that takes a list of layer or head indices passes it
through :func:`check_indices`; every response that could be large has its size
computed with :func:`check_size` before anything is built. Both raise
:class:`LimitError`, which names the field at fault; routers turn it into a 422
(REST) or an ``error`` message (websockets).

>>> check_indices("heads", [2, 0], 4)
(2, 0)
>>> try:
...     check_indices("heads", [0, 0], 4)
... except LimitError as exc:
...     exc.field, exc.message
('heads', 'head 0 is listed twice; list each head once')
>>> try:
...     check_size("heads", 10, 4, 4, limit=100)
... except LimitError as exc:
...     exc.field, exc.message[:44]
('heads', 'the response would hold 640 bytes, over this')
"""

from __future__ import annotations

import math
from collections.abc import Iterable

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


def check_size(field: str, *dims: int, limit: int, itemsize: int = 4) -> int:
    """The size in bytes of an array of shape ``dims``; raises when over ``limit``."""
    total = math.prod(dims) * itemsize
    if total > limit:
        raise LimitError(field, f"the response would hold {total} bytes, over this server's "
                                f"limit of {limit} bytes; ask for less (fewer heads, layers or "
                                "steps)")
    return total
