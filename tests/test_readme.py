"""The README's event-API example runs as written and does what its comments say."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from transformer_core.events import EventDispatcher

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block_after(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_event_api_example_collects_the_requested_slices():
    namespace: dict = {}
    try:
        exec(python_block_after("## The event API"), namespace)
    finally:
        EventDispatcher.get().clear()
    attentions = namespace["attentions"]
    assert len(attentions) == 4  # one per layer
    for matrix in attentions:
        assert matrix.shape == (2, 100, 100)  # sample 0, heads 0 and 2
        torch.testing.assert_close(matrix.sum(-1), torch.ones(2, 100))
