"""The wheel is the product: built from this checkout, installed into a clean venv (CPU
torch first, as ``make venv`` does), it serves the whole page with no source tree around.

Slow (a fresh venv takes a minute or two), so marked ``slow``; ``make test`` and
``.ci/run`` run it all the same.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

import attnscope

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "server", "frontend", "transformer_core")
WEB_STACK = ("fastapi", "starlette", "uvicorn")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=900, **kwargs)
    assert out.returncode == 0, f"{argv} failed:\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the sources (a stale ``build/`` cannot leak in)."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    dist = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir",
          str(dist), str(src)])
    (built,) = dist.glob("attnscope-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean venv holding CPU torch and the wheel (with its dependencies), nothing else."""
    env_dir = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", str(env_dir)])
    pip = [str(env_dir / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    _run([*pip, os.environ.get("TORCH_SPEC", "torch==2.13.0")])
    _run([*pip, "-c", str(ROOT / "constraints.txt"), str(wheel)])
    return env_dir


def test_wheel_holds_the_packages_and_the_page_and_no_server(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"attnscope", "transformer_core", f"{wheel.name.split('-py')[0]}.dist-info"}
    page = sorted(p.relative_to(ROOT).as_posix().replace("frontend/", "attnscope/frontend/", 1)
                  for p in (ROOT / "frontend").iterdir() if p.is_file())
    assert set(page) <= set(names)
    assert wheel.name.startswith(f"attnscope-{attnscope.__version__}-")


def test_import_loads_no_web_stack_and_reports_the_wheels_version(venv: Path,
                                                                  tmp_path: Path) -> None:
    code = ("import attnscope, importlib.metadata, importlib.util, json, sys\n"
            "from attnscope import Dashboard\n"
            f"web = [m for m in sys.modules if m.split('.')[0] in {WEB_STACK!r}]\n"
            "print(json.dumps({'web': web,\n"
            "  'version': attnscope.__version__,\n"
            "  'dist': importlib.metadata.version('attnscope'),\n"
            "  'file': attnscope.__file__,\n"
            "  'server': importlib.util.find_spec('server') is not None}))")
    out = _run([str(venv / "bin" / "python"), "-c", code], cwd=tmp_path)
    report = json.loads(out.stdout)
    assert report["web"] == []
    assert report["version"] == report["dist"] == attnscope.__version__
    assert Path(report["file"]).is_relative_to(venv)  # the installed copy, not this checkout
    assert report["server"] is False
    version = _run([str(venv / "bin" / "attnscope"), "--version"], cwd=tmp_path)
    assert version.stdout.strip() == f"attnscope {attnscope.__version__}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _referenced(text: str) -> set[str]:
    """Files a page or an ES module loads: ``src=``/``href=``, ``from "./x.js"`` and
    the vendored scripts it loads later (``"/vendor/plotly.min.js"``)."""
    refs = set(re.findall(r'(?:src|href)="([^":]+)"', text))
    refs |= set(re.findall(r'(?:from|import)\s*"\./([^"]+)"', text))
    refs |= set(re.findall(r'"(/vendor/[^"]+\.js)"', text))
    return {r.removeprefix("./").removeprefix("/") for r in refs}


@pytest.mark.parametrize("command", ["demo", "serve"])
def test_installed_command_serves_the_page_and_every_script(venv: Path, tmp_path: Path,
                                                            command: str) -> None:
    port = _free_port()
    argv = [str(venv / "bin" / "attnscope"), command, "--port", str(port)]
    if command == "demo":
        argv.append("--no-browser")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(ATTNSCOPE_DATA_DIR=str(tmp_path / "data"), ATTNSCOPE_TORCH_THREADS="1")
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/api/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "did not start"
            time.sleep(0.2)
        page = httpx.get(url + "/", timeout=10)
        assert page.status_code == 200
        assert page.text == (ROOT / "frontend" / "index.html").read_text()
        seen: set[str] = set()
        todo = _referenced(page.text)
        assert "app.js" in todo
        while todo:
            path = todo.pop()
            seen.add(path)
            response = httpx.get(f"{url}/{path}", timeout=10)
            assert response.status_code == 200, path
            if path.endswith(".js") and not path.startswith("vendor/"):
                todo |= _referenced(response.text) - seen
        assert {"api.js", "decode.js", "style.css", "vendor/plotly.min.js"} <= seen
        # the HTML export's standalone page, built from the installed package data
        shell = httpx.get(url + "/export/standalone.html", timeout=60)
        assert shell.status_code == 200 and "<!--attnscope:data-->" in shell.text
        assert 'modules["standalone.js"]' in shell.text
        if command == "demo":
            runs = httpx.get(url + "/api/v1/runs", timeout=10).json()
            assert [r["id"] for r in runs] == ["demo"]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "not installed" not in out and "Traceback" not in out, out
