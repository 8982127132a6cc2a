"""Specs: what a value of an attention parameter must look like, and its canonical form.

A spec's :meth:`Spec.get` returns the canonical value or raises ``ValueError``;
the registry wraps that error in one that names the parameter.

>>> Int.get(3), Optional(Int, 10).get(None), Choice(["a", "b"]).get("b")
(3, 10, 'b')
>>> Int.get(2.5)
Traceback (most recent call last):
...
ValueError: expected an int, got 2.5
"""

from __future__ import annotations

import operator
from collections.abc import Callable as CallableType
from typing import Any

from ..events import EventDispatcher


class Spec:
    """A parameter type: ``predicate(x)`` returns the canonical value or raises ValueError.

    ``name`` is what ``repr`` shows in error messages. Two specs are equal only
    when they are the same object (subclasses with arguments compare those).
    """

    def __init__(self, predicate: CallableType[[Any], Any], name: str = "CustomSpec") -> None:
        self._predicate = predicate
        self._name = name

    def __repr__(self) -> str:
        return self._name

    def get(self, x: Any) -> Any:
        """The canonical value of ``x``; ValueError when ``x`` is not acceptable."""
        try:
            return self._predicate(x)
        except TypeError as e:  # e.g. int(None): a wrong type is a wrong value here
            raise ValueError(str(e)) from e

    def check(self, x: Any) -> bool:
        """Whether :meth:`get` accepts ``x``."""
        try:
            self.get(x)
        except ValueError:
            return False
        return True

    def __eq__(self, other: object) -> bool:
        return self is other

    def __hash__(self) -> int:
        return id(self)


class Choice(Spec):
    """One of ``choices``."""

    def __init__(self, choices) -> None:
        super().__init__(self._pick, f"Choice({choices!r})")
        self._choices = choices

    def _pick(self, x: Any) -> Any:
        if x in self._choices:
            return x
        raise ValueError(f"expected one of {self._choices!r}, got {x!r}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Choice) and self._choices == other._choices

    def __hash__(self) -> int:
        return hash(repr(self))


class Optional(Spec):
    """None (then ``default``) or a value of ``spec``."""

    def __init__(self, spec: Spec, default: Any = None) -> None:
        super().__init__(self._pick, f"Optional[{spec!r}, {default!r}]")
        self._other_spec = spec
        self._default = default

    def _pick(self, x: Any) -> Any:
        return self._default if x is None else self._other_spec.get(x)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Optional) and self._other_spec == other._other_spec
                and self._default == other._default)

    def __hash__(self) -> int:
        return hash(repr(self))


def _int(x: Any) -> int:
    if isinstance(x, bool):
        raise ValueError(f"expected an int, got {x!r}")
    try:
        return operator.index(x)  # ints and integer scalars (numpy, 0-d tensors); not 2.5
    except TypeError:
        raise ValueError(f"expected an int, got {x!r}") from None


def _float(x: Any) -> float:
    if isinstance(x, bool) or not isinstance(x, int | float) and not hasattr(x, "__float__"):
        raise ValueError(f"expected a float, got {x!r}")
    return float(x)


def _bool(x: Any) -> bool:
    if isinstance(x, bool) or x in (0, 1):  # 0/1 as argparse and config files give them
        return bool(x)
    raise ValueError(f"expected a bool, got {x!r}")


def _callable(x: Any) -> Any:
    if callable(x):
        return x
    raise ValueError(f"expected a callable, got {x!r}")


def _dispatcher(x: Any) -> str | EventDispatcher:
    if isinstance(x, str | EventDispatcher):
        return x
    raise ValueError(f"expected a dispatcher key (str) or an EventDispatcher, got {x!r}")


Int = Spec(_int, "Int")
Float = Spec(_float, "Float")
Bool = Spec(_bool, "Bool")
Callable = Spec(_callable, "Callable")
EventDispatcherInstance = Spec(_dispatcher, "EventDispatcherInstance")

__all__ = ["Bool", "Callable", "Choice", "EventDispatcherInstance", "Float", "Int", "Optional",
           "Spec"]
