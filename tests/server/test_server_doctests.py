"""The docstring examples of the server modules run (pytest's testpaths leave out server/)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["server", "server.settings", "server.runs", "server.protocol",
           "server.stream.stats", "server.stream.frames"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
