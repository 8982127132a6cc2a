"""One self-contained .html file showing every head of one input: the data, plotly.js and
the page's own drawing code embedded, so it opens offline, from disk, with hover values.

:func:`page_data` turns attention arrays (one (H, L, S) array per layer) and token
labels into the file's data (matrices as base64 float16, as the live page receives
them; head statistics and roles for the layers x heads map); :func:`render` puts them
into :func:`shell` (the page without data, which the server also hands to the live
page's "HTML" export); :func:`write_html` does both and writes the file.
``attnscope.show`` and the page's export button both end here. The data's fields and
the size limit: docs/standalone.md.

>>> import numpy as np
>>> p = np.stack([np.eye(3), np.full((3, 3), 1 / 3)])        # (H=2, L=3, S=3)
>>> data = page_data({0: p}, ["The", " cat", " sat"], title="self and even")
>>> frame = data["frames"][0]
>>> frame["shape"], frame["pool"], frame["labels"]["keys"]
([2, 3, 3], 1, ['The', ' cat', ' sat'])
>>> data["roles"], [round(e, 3) for e in data["stats"][0]["values"]["entropy"]]
([['diagonal', 'local']], [0.0, 1.0])
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .assets import frontend_text, plotly_js_path
from .bundle import bundle
from .jsonsafe import json_safe
from .reduce import layer_statistics, pool_factor, pool_labels, pool_matrix
from .roles import PATTERN_NAMES, assign_roles
from .stats import STAT_NAMES

logger = logging.getLogger(__name__)

FORMAT = "attnscope-standalone"
VERSION = 1
# Embedded data (base64 text) per file, plotly.js (~4.8 MB) not counted. 8 MiB holds a
# 12 x 12-head model at 140 tokens unpooled (float16), keeps a notebook that shows a few
# of these responsive, and a browser opens the file in about a second.
MAX_DATA_BYTES = 8 * 2**20
# The largest side drawn, as the live page's focus view (frontend/app.js FOCUS_MAX_SIDE):
# a plotly heatmap with hover on 512 x 512 cells is still quick to draw.
MAX_SIDE = 512
# Pooling stops here: below 16 rows a head's pattern is no longer readable.
MIN_SIDE = 16
VIEWS = ("overview", "map", "focus")
KINDS = ("attention", "qk_logits")
SCALES = ("head", "row", "log", "fixed")  # frontend/colormap.js SCALES
DATA_MARKER = "<!--attnscope:data-->"
_MARKERS = ("<!--attnscope:head-->", "<!--attnscope:plotly-->", "<!--attnscope:script-->")


class StandaloneTooLarge(ValueError):
    """The views do not fit in ``max_bytes`` even pooled to :data:`MIN_SIDE` per side."""


def _float16_b64(values: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(values, dtype="<f2").tobytes()).decode("ascii")


def _b64_size(n_values: int) -> int:
    """Bytes of the base64 text of ``n_values`` float16 values."""
    return 4 * math.ceil(2 * n_values / 3)


def valid_keys(p: torch.Tensor) -> torch.Tensor | None:
    """Keys per query row (L,) that some head weighs above 0 (masked keys weigh exactly 0
    after the softmax), or None when every row sees all S keys."""
    valid = (p > 0).any(0).sum(-1)  # (L,)
    return None if bool((valid == p.shape[-1]).all()) else valid


def _statistics(layer: int, p: torch.Tensor) -> tuple[dict[str, Any], list[str | None]]:
    """The map's values of one layer's attention ``p`` (H, L, S), and its heads' roles."""
    rows = layer_statistics(p, valid_keys(p))  # (11, H)
    names = (*STAT_NAMES, *PATTERN_NAMES)
    values = {name: rows[i].tolist() for i, name in enumerate(names)}
    scores = {name: rows[len(STAT_NAMES) + i] for i, name in enumerate(PATTERN_NAMES)}
    roles = assign_roles(scores, [None] * p.shape[0])
    return {"layer": layer, "heads": list(range(p.shape[0])), "values": values}, roles


def _labels(labels: Any) -> tuple[list[str] | None, list[str] | None]:
    """``labels``: None, L strings (queries = keys), or a (queries, keys) pair."""
    if labels is None:
        return None, None
    if isinstance(labels, tuple) and len(labels) == 2 and not isinstance(labels[0], str):
        queries, keys = labels
        return (None if queries is None else [str(x) for x in queries],
                None if keys is None else [str(x) for x in keys])
    listed = [str(x) for x in labels]
    return listed, listed


def _pool_for(shapes: Sequence[tuple[int, int, int]], max_bytes: int) -> int:
    """The smallest pooling factor that brings every side to :data:`MAX_SIDE` and the data
    to ``max_bytes``; raises :class:`StandaloneTooLarge` when that needs sides below
    :data:`MIN_SIDE`."""
    longest = max(max(length, keys) for _, length, keys in shapes)
    factor = pool_factor(longest, longest, MAX_SIDE)

    def size(f: int) -> int:
        return sum(_b64_size(h * math.ceil(length / f) * math.ceil(keys / f))
                   for h, length, keys in shapes)

    while size(factor) > max_bytes:
        if math.ceil(longest / (factor + 1)) < min(MIN_SIDE, longest) or factor >= longest:
            heads = sum(h for h, _, _ in shapes)
            raise StandaloneTooLarge(
                f"{len(shapes)} layers, {heads} heads: even pooled to {MIN_SIDE} rows per "
                f"head the data would take {size(factor)} bytes, over the limit of "
                f"{max_bytes}; select fewer layers or heads, or raise max_bytes")
        factor += 1
    return factor


def page_data(
    layers: Mapping[int, Any],
    labels: Any = None,
    *,
    title: str = "",
    subtitle: str = "",
    names: Sequence[str] | None = None,
    kind: str = "attention",
    view: str = "overview",
    focus: tuple[int, int] | None = None,
    scale: str = "head",
    n_layers: int | None = None,
    max_bytes: int = MAX_DATA_BYTES,
) -> dict[str, Any]:
    """The data of a standalone file (docs/standalone.md).

    ``layers``: layer index -> that layer's ``kind`` matrices (H, L, S) (numpy or torch,
    one sample); ``labels``: the tokens (L strings, or a (queries, keys) pair; an axis
    whose length differs shows indices); ``names``: the layers' module names;
    ``n_layers``: rows of the overview (default: the highest index + 1). Matrices are
    pooled (average, as the live page does) to at most :data:`MAX_SIDE` per side and,
    when they would pass ``max_bytes`` of embedded data, further, with a note saying so.
    Head statistics and roles (attention only) are computed before pooling.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {list(KINDS)}, got {kind!r}")
    if view not in VIEWS:
        raise ValueError(f"view: expected one of {list(VIEWS)}, got {view!r}")
    if scale not in SCALES:
        raise ValueError(f"scale: expected one of {list(SCALES)}, got {scale!r}")
    if not layers:
        raise ValueError("layers: nothing to show (no attention was captured)")
    mats = {int(i): torch.as_tensor(m).detach().float().cpu() for i, m in layers.items()}
    for i, m in mats.items():
        if m.ndim != 3:
            raise ValueError(f"layers[{i}]: expected (H, L, S), got shape {tuple(m.shape)}")
    queries, keys = _labels(labels)
    factor = _pool_for([tuple(m.shape) for m in mats.values()], max_bytes)
    frames, stats, roles = [], [], []
    rows = n_layers if n_layers is not None else max(mats) + 1
    for i in sorted(mats):
        m = mats[i]
        h, length, width = m.shape
        if kind == "attention":
            layer_stats, layer_roles = _statistics(i, m)
            stats.append(layer_stats)
            roles.append((i, layer_roles))
        pooled = pool_matrix(m, factor)  # (H, L', S')
        frames.append({
            "kind": kind, "layer": i, "heads": list(range(h)), "shape": list(pooled.shape),
            "dtype": "float16", "pool": factor, "data": _float16_b64(pooled.numpy()),
            "labels": {
                "queries": pool_labels(queries, factor) if queries and len(queries) == length
                else None,
                "keys": pool_labels(keys, factor) if keys and len(keys) == width else None,
            },
        })
    notes = []
    if factor > 1:
        longest = max(max(m.shape[1:]) for m in mats.values())
        notes.append(f"pooled {factor} x {factor} (averages): {longest} tokens shown as "
                     f"{math.ceil(longest / factor)} rows, to keep the file under "
                     f"{max_bytes / 2**20:.0f} MiB of data and {MAX_SIDE} rows a head")
        logger.info("standalone view: %s", notes[-1])
    role_rows: list[list[str | None]] = [[] for _ in range(rows)]
    for i, layer_roles in roles:
        role_rows[i] = layer_roles
    heads = max(m.shape[0] for m in mats.values())
    if focus is None and view == "focus":
        focus = (min(mats), 0)
    return json_safe({
        "format": FORMAT, "version": VERSION, "title": title, "subtitle": subtitle,
        "kind": kind, "view": view, "scale": scale,
        "focus": None if focus is None else {"layer": focus[0], "head": focus[1]},
        "model": {"layers": rows, "heads": heads,
                  "names": list(names) if names is not None else None},
        "frames": frames, "stats": stats, "roles": role_rows if kind == "attention" else None,
        "notes": notes,
    })


def _script(code: str) -> str:
    """``code`` in a ``<script>`` element: a ``</script`` or ``<!--`` in its strings or
    regular expressions must not end or bend the element (``<\\/`` is the same text there)."""
    code = code.replace("</script", "<\\/script").replace("<!--", "<\\!--")
    return f"<script>{code}</script>"


@functools.lru_cache(maxsize=1)
def shell() -> str:
    """The standalone page without data: ``frontend/standalone.html`` with the page's
    styles, plotly.js and the standalone page's scripts (:func:`~attnscope.core.bundle.bundle`
    of ``standalone.js``) inlined; :data:`DATA_MARKER` is where :func:`render` puts the data."""
    plotly = plotly_js_path()
    if plotly is None:  # pragma: no cover - plotly is a dependency
        raise RuntimeError("plotly.min.js not found in the installed plotly package")
    template = frontend_text("standalone.html")
    for marker in (*_MARKERS, DATA_MARKER):
        if template.count(marker) != 1:  # pragma: no cover - a broken install
            raise RuntimeError(f"standalone.html: expected one {marker}")
    head = (f'<meta name="attnscope-max-data-bytes" content="{MAX_DATA_BYTES}">\n'
            f"<style>\n{frontend_text('style.css')}\n{frontend_text('standalone.css')}</style>")
    parts = {
        _MARKERS[0]: head,
        _MARKERS[1]: _script(plotly.read_text("utf-8")),
        _MARKERS[2]: _script(bundle("standalone.js", frontend_text)),
    }
    for marker, text in parts.items():
        template = template.replace(marker, text, 1)
    return template


def data_element(data: dict[str, Any]) -> str:
    """``data`` as the ``<script type="application/json">`` element the page reads."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return ('<script type="application/json" id="attnscope-data">'
            + text.replace("<", "\\u003c") + "</script>")


def render(data: dict[str, Any]) -> str:
    """The standalone page holding ``data`` (:func:`page_data`)."""
    return shell().replace(DATA_MARKER, data_element(data), 1)


def write_html(path: str | Path, layers: Mapping[int, Any], labels: Any = None,
               **options: Any) -> Path:
    """Write the standalone page of ``layers`` (:func:`page_data`'s arguments) to ``path``."""
    path = Path(path)
    path.write_text(render(page_data(layers, labels, **options)), encoding="utf-8")
    return path


def capture_layers(tensors: Mapping[str, torch.Tensor], kind: str = "attention",
                   sample: int = 0) -> dict[int, torch.Tensor]:
    """``{layer: (H, L, S)}`` of one sample from a capture's tensors (``"attention.0"``:
    (N, H, L, S), as :func:`~attnscope.core.capture.run_capture` returns them)."""
    out = {}
    for name, tensor in tensors.items():
        what, _, index = name.partition(".")
        if what == kind and index.isdigit():
            out[int(index)] = tensor[sample]  # (H, L, S)
    return dict(sorted(out.items()))
