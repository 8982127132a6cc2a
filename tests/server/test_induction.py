"""The induction-heads demo: its task, and (bounded time) that training it through the
server makes a previous-token head in layer 0 and an induction head in layer 1, tagged
by GET /api/v1/runs/demo/heads, while the loss on the repeat halves."""

from __future__ import annotations

import time

import pytest
import torch
from stream_support import Served

from attnscope.training.demo_run import DemoRun
from attnscope.training.induction import InductionConfig, InductionTraining, RepeatTask
from attnscope.training.run import RunRegistry

TRAIN_LIMIT_S = 420  # the phase change takes ~30-60 s unloaded; this machine is shared


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_each_sequence_repeats_a_block_and_marks_the_predictable_tokens():
    task = RepeatTask(InductionConfig(seq_len=32, vocab=64))
    tokens, repeat = task.batch(16)  # (N, L), (N, L-1)
    for x, r in zip(tokens.tolist(), repeat.tolist(), strict=True):
        targets = [i + 1 for i, flag in enumerate(r) if flag]  # the positions predicted
        start = targets[0] - 1  # the repeat starts here; its first token is not predictable
        length = len(targets) + 1
        assert 32 // 4 <= length <= 32 // 2 and start == length
        assert x[start: start + length] == x[:length]
        assert targets == list(range(start + 1, start + length))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="seq_len"):
        InductionConfig(seq_len=3).validate()
    with pytest.raises(ValueError, match="lr"):
        InductionConfig(lr=0).validate()


def test_a_step_reports_the_repeat_loss_near_chance_at_first():
    training = InductionTraining(InductionConfig(device="cpu"))
    result = training.step()
    assert abs(result.repeat_loss - torch.log(torch.tensor(64.0)).item()) < 0.5
    assert len(result.tokens) == 64 and len(result.tokens[0]) == 32


@pytest.mark.slow
@pytest.mark.timeout(TRAIN_LIMIT_S + 120)
def test_induction_demo_grows_previous_token_and_induction_heads(tmp_path):
    demo = DemoRun(InductionConfig(device="cpu"), task="induction")
    registry = RunRegistry()
    registry.add(demo.run)
    with Served(registry, data_dir=tmp_path, history_every=20,
                history_probe_budget=None) as served:
        demo.start()
        try:
            heads, losses = _train_until_tagged(served, demo)
        finally:
            demo.close()
    roles = {(h["layer"], h["head"]): h["role"] for h in heads["heads"]}
    assert "previous_token" in [roles[(0, h)] for h in range(4)], heads
    assert "induction" in [roles[(1, h)] for h in range(4)], heads
    texts = [e["text"] for e in heads["events"]]
    assert any("L1" in t and "became an induction head" in t for t in texts), texts
    start, end = losses[0], min(losses[-20:])
    assert end < start / 2, f"repeat loss {start:.3f} -> {end:.3f}"


def _train_until_tagged(served: Served, demo: DemoRun) -> tuple[dict, list[float]]:
    deadline = time.monotonic() + TRAIN_LIMIT_S
    heads: dict = {}
    while time.monotonic() < deadline:
        time.sleep(2.0)
        heads = served.http.get("/api/v1/runs/demo/heads").json()
        roles = {(h["layer"], h["role"]) for h in heads.get("heads", [])}
        if (0, "previous_token") in roles and (1, "induction") in roles:
            scalars = served.http.get("/api/v1/runs/demo/scalars").json()
            losses = [v for v in scalars["values"]["repeat_loss"] if v is not None]
            if min(losses[-20:]) < losses[0] / 2:
                return heads, losses
    pytest.fail(f"no induction circuit after {TRAIN_LIMIT_S} s "
                f"({demo.training.steps_done} steps): {heads}")
