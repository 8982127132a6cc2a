"""BaseBuilder: parameters set as attributes, or from keyword arguments, a dict or argparse."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from typing import Any


class UnknownParameterError(ValueError, AttributeError):
    """A builder has no parameter of that name.

    A ``ValueError`` (the argument is wrong) and an ``AttributeError`` (setting
    an attribute the builder does not have), as fast-transformers' builders raise.
    """


def unknown(key: str, allowed: Iterable[str]) -> UnknownParameterError:
    """The error for an unknown builder argument ``key``, listing the allowed ones."""
    return UnknownParameterError(
        f"unknown builder argument {key!r}; allowed: {', '.join(sorted(allowed))}")


class BaseBuilder:
    """Construct a builder from keyword arguments, a dictionary or an argparse Namespace.

    Subclasses validate in ``__setattr__``: an unknown name raises
    :class:`UnknownParameterError`, an ill-typed value ``ValueError`` naming it.
    """

    @classmethod
    def from_kwargs(cls, strict: bool = True, **kwargs: Any):
        """A builder with ``kwargs`` set; unknown keys raise unless ``strict=False``."""
        return cls.from_dictionary(kwargs, strict=strict)

    @classmethod
    def from_dictionary(cls, dictionary: Mapping[str, Any], strict: bool = True):
        """A builder with ``builder.key = value`` done for every item; with
        ``strict=False`` keys that are not parameters are ignored (values of
        known keys are still validated)."""
        builder = cls()
        for key, value in dictionary.items():
            try:
                setattr(builder, key, value)
            except UnknownParameterError:
                if strict:
                    raise
        return builder

    @classmethod
    def from_namespace(cls, args: argparse.Namespace, strict: bool = False):
        """A builder from command-line arguments; other arguments are ignored unless
        ``strict``. An option left unset on the command line (None) stays None, and
        ``get()`` then says which parameter is missing."""
        builder = cls()
        for key, value in vars(args).items():
            if value is None and builder._accepts_none_from_cli(key):
                builder._set_missing(key)
                continue
            try:
                setattr(builder, key, value)
            except UnknownParameterError:
                if strict:
                    raise
        return builder

    def _accepts_none_from_cli(self, key: str) -> bool:
        """Whether ``key`` is a parameter that may be left None by :meth:`from_namespace`."""
        return False

    def _set_missing(self, key: str) -> None:
        raise NotImplementedError
