"""The page's ES modules as one classic script, for files that must run without a server.

A standalone page opened from disk (``file://``) or inside a notebook's iframe
(``srcdoc``) cannot load ``<script type="module" src=...>``: browsers refuse module
imports from ``file://``, and ``srcdoc`` has no folder to import from. :func:`bundle`
follows an entry module's relative imports and wraps each module in a function whose
return value is its exports, in dependency order, so the same files run in both places.

Only the forms the page uses are understood (``import {a, b as c} from "./x.js";``,
``import * as x from "./x.js";``, ``export function|class|const|let ...``,
``export { a, b };``); anything else raises :class:`BundleError` naming the module and
line, so a new form fails in the tests, not in a user's browser.

>>> sources = {"a.js": 'export const A = 1;\\nexport function twice(x) { return 2 * x; }',
...            "main.js": 'import { A, twice as t } from "./a.js";\\nwindow.out = t(A);'}
>>> code = bundle("main.js", sources.__getitem__)
>>> code.index('modules["a.js"]') < code.index('modules["main.js"]')
True
>>> "const { A, twice: t } = modules[\\"a.js\\"];" in code
True
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

_IMPORT = re.compile(
    r'^import\s+(?:(\{[^}]*\})|\*\s+as\s+(\w+))\s+from\s+"\./([\w.-]+\.js)";?[ \t]*$', re.M)
_EXPORT_DECL = re.compile(
    r"^export\s+((?:async\s+)?function\*?|class|const|let|var)\s+(\w+)", re.M)
_EXPORT_LIST = re.compile(r"^export\s*\{([^}]*)\};?[ \t]*$", re.M)
_LEFT = re.compile(r"^\s*(import|export)\b.*$", re.M)


class BundleError(ValueError):
    """A module the bundler cannot read: ``module`` names it."""

    def __init__(self, module: str, message: str) -> None:
        super().__init__(f"{module}: {message}")
        self.module = module


def _names(braces: str) -> list[tuple[str, str]]:
    """``{a, b as c}`` -> [("a", "a"), ("b", "c")]: (name in the module, local name)."""
    out = []
    for part in braces.strip("{} \n").split(","):
        words = part.split()
        if not words:
            continue
        if len(words) == 1:
            out.append((words[0], words[0]))
        elif len(words) == 3 and words[1] == "as":
            out.append((words[0], words[2]))
        else:
            raise ValueError(f"cannot read {part.strip()!r}")
    return out


def _module(name: str, text: str) -> tuple[str, list[str]]:
    """One module as a function body returning its exports, and the modules it imports."""
    deps: list[str] = []

    def imported(match: re.Match[str]) -> str:
        braces, star, dep = match.groups()
        deps.append(dep)
        if star:
            return f"const {star} = modules[{json.dumps(dep)}];"
        try:
            names = _names(braces)
        except ValueError as exc:
            raise BundleError(name, str(exc)) from None
        pairs = ", ".join(a if a == b else f"{a}: {b}" for a, b in names)
        return f"const {{ {pairs} }} = modules[{json.dumps(dep)}];"

    exports: list[tuple[str, str]] = []

    def declared(match: re.Match[str]) -> str:
        exports.append((match.group(2), match.group(2)))
        return f"{match.group(1)} {match.group(2)}"

    def listed(match: re.Match[str]) -> str:
        try:  # export { local as exported }: the pair reads (local, exported)
            exports.extend(_names(match.group(1)))
        except ValueError as exc:
            raise BundleError(name, str(exc)) from None
        return ""

    body = _EXPORT_LIST.sub(listed, _EXPORT_DECL.sub(declared, _IMPORT.sub(imported, text)))
    left = _LEFT.search(body)
    if left:
        line = text[: text.find(left.group(0).strip())].count("\n") + 1
        raise BundleError(name, f"line {line}: unsupported {left.group(1)} form "
                          f"{left.group(0).strip()!r}")
    returned = ", ".join(a if a == b else f"{b}: {a}" for a, b in exports)
    return f'"use strict";\n{body}\nreturn {{ {returned} }};', deps


def bundle(entry: str, read: Callable[[str], str]) -> str:
    """``entry`` (a module's file name) and every module it imports, as one classic script.

    ``read(name)`` returns a module's text. Modules run once each, dependencies first,
    as a browser runs them; a cycle raises :class:`BundleError`.
    """
    order: list[str] = []
    bodies: dict[str, str] = {}
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in bodies:
            return
        if name in visiting:
            raise BundleError(name, "import cycle")
        visiting.add(name)
        body, deps = _module(name, read(name))
        for dep in deps:
            visit(dep)
        visiting.discard(name)
        bodies[name] = body
        order.append(name)

    visit(entry)
    parts = [f"modules[{json.dumps(n)}] = (function () {{\n{bodies[n]}\n}})();" for n in order]
    return "(function () {\nconst modules = {};\n" + "\n".join(parts) + "\n})();\n"
