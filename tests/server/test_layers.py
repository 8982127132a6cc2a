"""attnscope's layout by process (docs/architecture.md): a module's path says which process
runs it, and imports point one way.

- ``attnscope.core`` and ``attnscope.contract``: what both processes use (computations,
  the model's layout, every message of the channel and of the publisher protocol);
- ``attnscope.training`` (and ``attnscope.integrations``, ``attnscope.client``): what runs
  in the user's training process; it imports the core and the contract, never the server;
- ``attnscope.backend``: the server process (web stack, hub, history writer, relay).

A training process never loads FastAPI, Starlette or uvicorn: ``Dashboard.start`` serves
from a process of its own, ``Dashboard.connect`` through a relay process.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "server"  # installed as attnscope
WEB_STACK = ("fastapi", "starlette", "uvicorn")
# Outside the three folders: the package itself and its settings (both sides read them),
# the command line (it starts a server) and the captures client (a script's).
SHARED = {"attnscope", "attnscope.settings"}
TRAINING_TOP = {"attnscope.client", "attnscope.integrations"}
LAYER_NAMES = ("core and contract", "training side", "server side")


def layer(module: str) -> int:
    """0: core and contract (and the package, its settings); 1: the training process;
    2: the server process (and the CLI)."""
    top = module.split(".")[1] if "." in module else ""
    if module in SHARED or top in ("core", "contract"):
        return 0
    if top in ("training", "integrations") or module in TRAINING_TOP:
        return 1
    return 2


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["attnscope", *parts])


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))
           if "__pycache__" not in p.parts}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def module_level_imports(name: str) -> set[str]:
    """Modules imported when ``name`` is imported (not in functions or TYPE_CHECKING)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names
                             if f"{base}.{a.name}" in MODULES)
            elif isinstance(node, ast.If) and not _is_type_checking(node):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)

    visit(ast.parse(path.read_text()).body)
    return found


def test_every_module_lives_in_a_process_folder() -> None:
    loose = sorted(m for m in MODULES if m.count(".") == 1 and m not in
                   SHARED | TRAINING_TOP | {"attnscope.cli"} and m.split(".")[1] not in
                   ("core", "contract", "training", "backend", "integrations", "frontend"))
    assert loose == [], f"modules outside the process folders: {loose}"


@pytest.mark.parametrize("name", sorted(m for m in MODULES if layer(m) < 2))
def test_core_and_training_side_import_no_web_framework(name: str) -> None:
    imports = module_level_imports(name)
    web = sorted(m for m in imports if m.split(".")[0] in WEB_STACK)
    assert web == [], f"{name} imports {web}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_one_way(name: str) -> None:
    upward = sorted(m for m in module_level_imports(name)
                    if m in MODULES and layer(m) > layer(name))
    assert upward == [], (f"{name} ({LAYER_NAMES[layer(name)]}) imports "
                          + ", ".join(f"{m} ({LAYER_NAMES[layer(m)]})" for m in upward))


def _loaded_after(code: str) -> dict:
    prelude = (
        "import json, sys\n"
        "from transformer_core.builders import TransformerEncoderBuilder\n"
        "net = TransformerEncoderBuilder.from_kwargs(n_layers=1, n_heads=2,\n"
        "    query_dimensions=4, value_dimensions=4, feed_forward_dimensions=8).get()\n")
    report = ("\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules\n"
              f"    if m.split('.')[0] in {WEB_STACK!r}}})))\n")
    out = subprocess.run([sys.executable, "-c", prelude + code + report], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_and_connect_load_no_web_framework() -> None:
    loaded = _loaded_after(
        "import attnscope\n"
        "from attnscope import Dashboard\n"
        "dash = Dashboard.connect(net, 'http://127.0.0.1:9', run='x')  # nobody there\n"
        "dash.step(0, loss=1.0)\n"
        "dash.close(timeout=1)\n")
    assert loaded == []


def test_start_serves_from_another_process_and_loads_no_web_framework_here() -> None:
    loaded = _loaded_after(
        "from attnscope import Dashboard\n"
        "dash = Dashboard.start(net, port=0, quiet=True)\n"
        "dash.step(0, loss=1.0)\n"
        "dash.close()\n")
    assert loaded == []


def test_the_in_process_server_loads_the_web_framework_when_called() -> None:
    loaded = _loaded_after(
        "from attnscope import Dashboard\n"
        "dash = Dashboard.start(net, port=0, quiet=True, server_process=False)\n"
        "dash.close()\n")
    assert loaded == list(WEB_STACK)
