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
        config._attnscope_data_dir = os.environ["ATTNSCOPE_DATA_DIR"]  # removed at the end


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the session's temporary data folder (one per run would pile up in /tmp)."""
    import shutil

    made = getattr(config, "_attnscope_data_dir", None)
    if made:
        shutil.rmtree(made, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def _module_data_dir(tmp_path_factory: pytest.TempPathFactory):
    """A fresh data dir per test module (for module-scoped servers): every run a server
    ever recorded there is listed by the servers that open it later, so tests that
    share one would see each other's runs."""
    yield from _data_dir(tmp_path_factory.mktemp("data"))


@pytest.fixture(autouse=True)
def _test_data_dir(tmp_path_factory: pytest.TempPathFactory):
    """A fresh data dir per test (see ``_module_data_dir``)."""
    yield from _data_dir(tmp_path_factory.mktemp("data"))


def _data_dir(path):
    import os

    before = os.environ.get("ATTNSCOPE_DATA_DIR")
    os.environ["ATTNSCOPE_DATA_DIR"] = str(path)
    try:
        yield path
    finally:
        if before is None:
            os.environ.pop("ATTNSCOPE_DATA_DIR", None)
        else:
            os.environ["ATTNSCOPE_DATA_DIR"] = before
