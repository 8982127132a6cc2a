"""The three layers of attnscope (docs/architecture.md), and imports pointing one way:
web side -> training side -> core -> transformer_core.

A training process that only publishes (``Dashboard.connect``) never loads FastAPI,
Starlette or uvicorn; ``Dashboard.start`` loads them when it is called.
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

# Core: run state, model layout, statistics, frames and the wire format.
CORE = {
    "attnscope", "attnscope.layout", "attnscope.run_base", "attnscope.jsonsafe",
    "attnscope.protocol", "attnscope.model_inputs",
    "attnscope.storage", "attnscope.stream", "attnscope.stream.plan", "attnscope.stream.stats",
    "attnscope.stream.reduce", "attnscope.stream.rowstats",
    "attnscope.stream.frames", "attnscope.remote", "attnscope.remote.wire",
    "attnscope.remote.checks",
    "attnscope.captures", "attnscope.captures.capture", "attnscope.captures.store",
    "attnscope.captures.formats", "attnscope.history", "attnscope.history.store",
    "attnscope.history.config", "attnscope.history.thinning", "attnscope.stream.roles",
    "attnscope.history.roles", "attnscope.limits", "attnscope.tokens",
    "attnscope.contract", "attnscope.contract.ring", "attnscope.contract.channel",
    "attnscope.contract.messages", "attnscope.sockets",
    "attnscope.assets", "attnscope.bundle", "attnscope.standalone", "attnscope.look",
    "attnscope.alerts", "attnscope.alerts.rules", "attnscope.alerts.book",
    "attnscope.alerts.webhook",
}
# Training side: Dashboard, the publishers, the history recorder and outbox, the demo.
TRAINING = {
    "attnscope.dashboard", "attnscope.runs", "attnscope.stream.publisher", "attnscope.stream.rows",
    "attnscope.remote.publisher", "attnscope.remote.captures", "attnscope.remote.history",
    "attnscope.history.recorder", "attnscope.history.service", "attnscope.demo",
    "attnscope.demo_run", "attnscope.client", "attnscope.induction", "attnscope.collapse",
    "attnscope.integrations", "attnscope.integrations._common",
    "attnscope.integrations.huggingface", "attnscope.integrations.lightning",
    "attnscope.budget", "attnscope.training", "attnscope.training.link",
    "attnscope.training.process", "attnscope.training.staging",
}
# Everything else is the web side (app, routers, hub, endpoints, auth, settings, CLI).
LAYER_NAMES = ("core", "training side", "web side")


def layer(module: str) -> int:
    return 0 if module in CORE else 1 if module in TRAINING else 2


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


def test_the_layer_table_names_real_modules() -> None:
    assert set(MODULES) >= CORE | TRAINING


@pytest.mark.parametrize("name", sorted(CORE | TRAINING))
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
