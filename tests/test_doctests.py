"""The docstring examples of the ``attnscope`` package run, imported by their installed names.

pytest's ``--doctest-modules`` covers ``transformer_core/`` and ``tests/``; it is not
pointed at ``server/``, whose files it would import a second time as ``server.*``
beside the real ``attnscope.*`` modules. This test runs those examples instead.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import attnscope


def _modules_with_examples() -> list[str]:
    names = ["attnscope", *(m.name for m in pkgutil.walk_packages(attnscope.__path__,
                                                                  "attnscope."))]
    finder = doctest.DocTestFinder()
    return sorted(name for name in names
                  if any(t.examples for t in finder.find(importlib.import_module(name))))


MODULES = _modules_with_examples()


def test_the_package_has_examples_to_run() -> None:
    # Guards the walk itself: a broken import path would leave nothing to run.
    assert {"attnscope", "attnscope.contract.protocol"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)  # pytest's default flags
    report: list[str] = []
    for test in doctest.DocTestFinder().find(module):
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
