"""pyproject.toml maps the repository onto the distribution completely: every Python
package folder is listed (under its installed name) and every file of the page is
package data. tests/test_wheel.py builds and installs the wheel itself (slow)."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
FOLDERS = {"server": "attnscope", "frontend": "attnscope.frontend",
           "transformer_core": "transformer_core"}


def _installed_name(folder: Path) -> str:
    rel = folder.relative_to(ROOT).parts
    return ".".join([FOLDERS[rel[0]], *rel[1:]])


def test_every_package_folder_is_listed_under_its_installed_name() -> None:
    assert CONFIG["package-dir"] == {k: v for v, k in FOLDERS.items() if k != v}
    found = {_installed_name(init.parent) for top in FOLDERS
             for init in (ROOT / top).rglob("__init__.py") if "__pycache__" not in init.parts}
    assert set(CONFIG["packages"]) == found
    assert not any(p == "server" or p.startswith("server.") for p in CONFIG["packages"])


def test_every_file_of_the_page_is_package_data() -> None:
    patterns = CONFIG["package-data"]["attnscope.frontend"]
    page = [p.name for p in (ROOT / "frontend").iterdir()
            if p.is_file() and p.suffix != ".py"]
    assert "index.html" in page
    missed = [name for name in page if not any(fnmatch.fnmatch(name, g) for g in patterns)]
    assert missed == []


def test_the_version_is_written_once() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and project["dynamic"] == ["version"]
    assert CONFIG["dynamic"]["version"] == {"attr": "attnscope.__version__"}
