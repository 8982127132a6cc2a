"""Validated builder parameters: default, check, and the reason for the default."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..events import EventDispatcher


@dataclass(frozen=True)
class Param:
    default: Any
    check: Callable[[Any], bool]
    expected: str  # what a valid value looks like, for the error message
    reason: str  # why the default is what it is


def positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def probability(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1


def optional_positive_float(value: Any) -> bool:
    return value is None or (
        isinstance(value, int | float) and not isinstance(value, bool) and value > 0
    )


def one_of(*choices: str) -> Callable[[Any], bool]:
    return lambda value: value in choices


def dispatcher_like(value: Any) -> bool:
    return isinstance(value, str | EventDispatcher)


def optional_callable(value: Any) -> bool:
    return value is None or callable(value)


def boolean(value: Any) -> bool:
    return isinstance(value, bool)
