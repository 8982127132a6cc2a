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


def test_recurrent_inference_example_steps_once_per_token():
    namespace: dict = {}
    try:
        exec(python_block_after("### Recurrent inference"), namespace)
    finally:
        EventDispatcher.get().clear()
    run = namespace["dash"].run
    assert run.status == "ended" and run.step_index == 11 and run.sequence == 2
    assert run.labels(0) == ["t11"]  # the last row's label
    assert namespace["x"].shape == (1, 64) and len(namespace["state"]) == 2  # one per layer
