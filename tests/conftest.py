"""Shared pytest configuration: GPU tests skip cleanly where CUDA is missing."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every ``@pytest.mark.gpu`` test when ``torch.cuda.is_available()`` is false."""
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is false)")
    for item in gpu_items:
        item.add_marker(skip)


def pytest_configure(config: pytest.Config) -> None:
    """Keep every server the tests start (in-process or subprocess) out of the
    user's real data folder: captures and history go to a fresh temporary one."""
    import os
    import tempfile

    if "ATTNSCOPE_DATA_DIR" not in os.environ:
        os.environ["ATTNSCOPE_DATA_DIR"] = tempfile.mkdtemp(prefix="attnscope-test-data-")
