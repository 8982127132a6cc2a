"""``attnscope.show(model, tokenizer, "The cat sat on the mat")``: every layer and head of
one input, from one forward pass (no training loop, no server), as a page that a notebook
shows inline and that can be saved as one standalone .html file.

Any model attnscope watches works (``transformer_core``, Hugging Face, modules using
``nn.MultiheadAttention`` or ``F.scaled_dot_product_attention``): the pass is
:func:`~attnscope.core.capture.run_capture`'s, the page
:mod:`attnscope.core.standalone`'s. :func:`view_of` makes the page of a capture taken
elsewhere (a run's, between two training steps).
"""

from __future__ import annotations

import html
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..contract.layout import LocalModel, ModelLayout
from ..core.capture import run_capture
from ..core.model_inputs import TextTokenizer
from ..core.standalone import MAX_DATA_BYTES, capture_layers, page_data, render

logger = logging.getLogger(__name__)

TITLE_CHARS = 80  # a longer text is cut in the page's title (the axes show every token)


class HeadsView:
    """What :func:`show` returns: the standalone page of one input.

    In Jupyter or VS Code it displays itself (``_repr_html_``: the page in an iframe's
    ``srcdoc``, so its scripts run isolated from the notebook's); :meth:`save` writes it
    as a file; :attr:`html` is the page.
    """

    def __init__(self, page: str, summary: str, height: int) -> None:
        self.html = page
        self.summary = summary
        self.height = height

    def save(self, path: str | Path) -> Path:
        """Write the page to ``path`` (one self-contained .html file)."""
        path = Path(path)
        path.write_text(self.html, encoding="utf-8")
        return path

    def _repr_html_(self) -> str:
        # srcdoc is an attribute: only & and " need escaping there.
        doc = self.html.replace("&", "&amp;").replace('"', "&quot;")
        return (f'<iframe class="attnscope-view" title="attnscope: {html.escape(self.summary)}" '
                f'style="width: 100%; height: {self.height}px; border: 0" '
                f'srcdoc="{doc}"></iframe>')

    def __repr__(self) -> str:
        return f"<attnscope view: {self.summary}>"


def _tokenizer(tokenizer: Any) -> TextTokenizer:
    """A Hugging Face tokenizer as runs use it; a ``tokenizers.Tokenizer`` is wrapped in
    ``transformers.PreTrainedTokenizerFast`` first."""
    tokenizers = sys.modules.get("tokenizers")
    if tokenizers is not None and isinstance(tokenizer, tokenizers.Tokenizer):
        try:
            from transformers import PreTrainedTokenizerFast
        except ImportError:
            raise TypeError("a tokenizers.Tokenizer needs transformers installed (it is "
                            "wrapped in PreTrainedTokenizerFast); or give tokens=") from None
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    return TextTokenizer(tokenizer)


def _one_row(x: Any, name: str, dims: int, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as a batch of one: (1, L) for tokens (dims=1), (1, L, d) for features (dims=2)."""
    t = torch.as_tensor(x, dtype=dtype)
    if t.ndim == dims:
        t = t[None]
    if t.ndim != dims + 1 or t.shape[0] != 1 or t.shape[1] == 0:
        want = "(L,) or (1, L)" if dims == 1 else "(L, d) or (1, L, d)"
        raise ValueError(f"{name}: expected one sequence, shape {want}, got {tuple(t.shape)}")
    return t


def _inputs(tokenizer: Any, text: Any, tokens: Any, features: Any
            ) -> tuple[torch.Tensor, torch.Tensor | None, list[str] | None]:
    """The model's input (1, L) or (1, L, d), its attention mask and the token labels."""
    given = [name for name, v in (("text", text), ("tokens", tokens), ("features", features))
             if v is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of text (with a tokenizer), tokens= or features=; "
                         f"got {given or 'none'}")
    wrapped = None if tokenizer is None else _tokenizer(tokenizer)
    if text is not None:
        if not isinstance(text, str):
            raise TypeError(f"text: expected a string, got {type(text).__name__} "
                            "(token ids go in tokens=, features in features=)")
        if wrapped is None:
            raise ValueError("text needs a tokenizer: show(model, tokenizer, text); "
                             "or give tokens= (ids) or features=")
        ids, mask = wrapped.encode([text])  # (1, L)
        return ids, mask, wrapped.labels(ids[0])
    if tokens is not None:
        ids = _one_row(tokens, "tokens", 1, torch.long)  # (1, L)
        if wrapped is not None:
            return ids, None, wrapped.labels(ids[0])
        return ids, None, [str(i) for i in ids[0].tolist()]
    return _one_row(features, "features", 2, torch.float32), None, None  # (1, L, d)


def _height(n_layers: int) -> int:
    """The iframe's height: the toolbar and a row of thumbnails per layer, within reason
    (the page scrolls inside it beyond)."""
    return max(640, min(900, 200 + 104 * n_layers))


def view_of(
    layout: ModelLayout,
    tensors: Mapping[str, torch.Tensor],
    labels: Sequence[str] | None,
    *,
    title: str,
    model_name: str,
    kind: str = "attention",
    sample: int = 0,
    height: int | None = None,
    **options: Any,
) -> HeadsView:
    """The page of one capture: ``tensors`` as :func:`~attnscope.core.capture.run_capture`
    returns them (``"attention.0"``: (N, H, L, S)) for ``layout``'s model, sample
    ``sample``, its tokens ``labels``. ``options``: :func:`~attnscope.core.standalone.page_data`'s
    ``view``, ``focus``, ``scale``, ``max_bytes``."""
    matrices = capture_layers(tensors, kind, sample)
    if not matrices:
        raise ValueError(f"tensors: no {kind}.<layer> tensor to show")
    length = next(iter(matrices.values())).shape[1]
    heads = max(m.shape[0] for m in matrices.values())
    summary = f"{model_name}, {length} tokens, {layout.n_layers} layers x {heads} heads"
    if len(title) > TITLE_CHARS:
        title = title[: TITLE_CHARS - 1] + "…"
    data = page_data(matrices, labels, title=title, subtitle=summary,
                     names=[s.name for s in layout.sites], kind=kind,
                     n_layers=layout.n_layers, **options)
    return HeadsView(render(data), summary, height or _height(layout.n_layers))


def show(
    model: nn.Module,
    tokenizer: Any = None,
    text: str | None = None,
    *,
    tokens: Any = None,
    features: Any = None,
    labels: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    kind: str = "attention",
    view: str = "overview",
    focus: tuple[int, int] | None = None,
    scale: str = "head",
    path: str | Path | None = None,
    max_bytes: int = MAX_DATA_BYTES,
    height: int | None = None,
) -> HeadsView:
    """Every head of ``model`` on one input: displayed inline in a notebook, written to
    ``path`` (a standalone .html file) when given.

    The input is ``text`` (tokenized by ``tokenizer``, a Hugging Face tokenizer or a
    ``tokenizers.Tokenizer``), or ``tokens=`` (ids, (L,)) or ``features=`` ((L, d), for
    models without an embedding). Token strings label both axes (``labels=`` overrides
    them). ``layers`` selects layers (default all); ``kind`` is ``"attention"`` or
    ``"qk_logits"``; ``view`` opens the file on ``"overview"``, ``"map"`` or ``"focus"``
    (of ``focus=(layer, head)``); ``scale`` is the colour scale (``"head"``, ``"row"``,
    ``"log"``, ``"fixed"``). Views past ``max_bytes`` of data are pooled
    (docs/standalone.md). The model runs once in eval mode without gradients; its
    training mode is restored.
    """
    x, mask, token_labels = _inputs(tokenizer, text, tokens, features)
    local = LocalModel(model)
    tensors = run_capture(model, x, [kind], layers=layers, local=local, attention_mask=mask)
    title = text if text is not None else \
        f"{x.shape[1]} {'tokens' if tokens is not None else 'positions'}"
    shown = view_of(local.layout, tensors, list(labels) if labels is not None else token_labels,
                    title=title, model_name=type(model).__name__, kind=kind, view=view,
                    focus=focus, scale=scale, max_bytes=max_bytes, height=height)
    if path is not None:
        logger.info("wrote %s", shown.save(path))
    return shown
