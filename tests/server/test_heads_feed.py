"""The ``heads`` websocket message (kind ``head_roles``): roles pushed to the viewers that
ask, from the history when it records the run, else from the stream's own head_stats."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import torch
from stream_support import Served, Trainer, connect, recv_json, run_async, small_encoder

from attnscope.backend.frames import encode_stats
from attnscope.backend.heads_feed import StreamRoles
from attnscope.contract.plan import Capture
from attnscope.core.roles import RoleRule
from attnscope.training.run import Run, RunRegistry
from transformer_core.events import EventDispatcher

L = 8


def head_stats_capture(step: int, seq: int) -> Capture:
    """A head_stats capture of layer 0: head 0 attends to itself, head 1 to the previous key."""
    eye = torch.eye(L)
    previous = torch.zeros(L, L)
    previous[0, 0] = 1.0
    previous[torch.arange(1, L), torch.arange(L - 1)] = 1.0
    data = torch.stack([eye, previous]).to(torch.float16)  # (H=2, L, S)
    return Capture("head_stats", 0, 0, (0, 1), data, "self", 0.0, step=step, seq=seq)


def test_stream_roles_come_from_the_head_stats_text_the_stream_sends():
    cap = head_stats_capture(step=7, seq=1)
    text = encode_stats("r", cap)  # what viewers of head_stats receive
    roles = StreamRoles(layers=1, heads=2, rule=RoleRule())
    assert roles.take(0, cap.seq, text)
    assert not roles.take(0, cap.seq, text)  # the same capture twice: nothing new
    roles.observe()
    message = roles.message("r", RoleRule())
    assert [h["role"] for h in message["heads"]] == ["diagonal", "previous_token"]
    assert [h["since"] for h in message["heads"]] == [7, 7]
    assert message["source"] == "stream" and message["induction"] is False
    assert "history" in message["note"]
    sent = json.loads(text)
    for h in message["heads"]:  # the statistics are the stream's own, not recomputed
        assert h["stats"]["entropy"] == sent["entropy"][h["head"]]
        assert h["scores"]["previous_token"] == sent["previous_token"][h["head"]]
        assert h["scores"]["induction"] is None  # needs the history's probe
    assert message["heads"][1]["scores"]["previous_token"] == pytest.approx(1.0)


def test_stream_roles_reject_negative_sizes():
    with pytest.raises(ValueError, match="layers"):
        StreamRoles(layers=-1, heads=2, rule=RoleRule())


def toy_run(dispatcher: EventDispatcher) -> tuple[RunRegistry, Run, torch.nn.Module, torch.Tensor]:
    model = small_encoder(dispatcher)  # 2 layers x 2 heads, d_model 8
    torch.manual_seed(1)
    registry = RunRegistry()
    run = registry.add(Run(model, run_id="toy"))
    return registry, run, model, torch.randn(2, 6, 8)


async def heads_messages(ws, seconds: float) -> list[dict]:
    """Every ``heads`` message received within ``seconds``."""
    out = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            message = await asyncio.wait_for(ws.recv(), left)
        except TimeoutError:
            break
        if isinstance(message, str) and json.loads(message)["type"] == "heads":
            out.append(json.loads(message))
    return out


def test_without_history_roles_come_from_the_stream_and_only_to_who_asks():
    registry, run, model, x = toy_run(EventDispatcher())
    with Served(registry, history_enabled=False) as served, Trainer(run, model, x, period=0.01):
        async def body():
            roles_ws = await connect(served.ws_url)
            plain_ws = await connect(served.ws_url)
            await roles_ws.send(json.dumps({"type": "subscribe", "run": "toy", "max_fps": 20,
                                            "kinds": ["head_stats", "head_roles"]}))
            await plain_ws.send(json.dumps({"type": "subscribe", "run": "toy",
                                            "kinds": ["head_stats"]}))
            first = await recv_json(roles_ws, "heads", timeout=15)
            assert first["source"] == "stream" and first["induction"] is False
            assert [(h["layer"], h["head"]) for h in first["heads"]] == \
                [(0, 0), (0, 1), (1, 0), (1, 1)]
            for h in first["heads"]:
                assert 0.0 <= h["stats"]["entropy"] <= 1.0
                assert h["scores"]["induction"] is None
            # a message when something changed, at most about once a second
            more = await heads_messages(roles_ws, 3.2)
            assert 1 <= len(more) <= 4, len(more)
            assert more[-1]["step"] > first["step"]
            assert await heads_messages(plain_ws, 0.1) == []  # it never asked
            await roles_ws.close()
            await plain_ws.close()
        run_async(body, timeout=40)


def test_with_history_the_message_is_the_rest_answer(tmp_path):
    registry, run, model, x = toy_run(EventDispatcher())
    settings = {"data_dir": tmp_path, "history_every": 1, "history_probe_budget": None}
    with Served(registry, **settings) as served, Trainer(run, model, x, period=0.01):
        async def body():
            ws = await connect(served.ws_url)
            await ws.send(json.dumps({"type": "subscribe", "run": "toy",
                                      "kinds": ["scalars", "head_roles"]}))
            message = await recv_json(ws, "heads", timeout=15)
            while not message["heads"]:  # recorded, first step not stored yet
                message = await recv_json(ws, "heads", timeout=15)
            await ws.close()
            return message
        message = run_async(body, timeout=40)
        rest = served.http.get("/api/v1/runs/toy/heads",
                               params={"step": message["step"]}).json()
    assert message["source"] == "history" and message["induction"] is True
    assert message["session"] == rest["session"] and message["step"] == rest["step"]
    assert [h["role"] for h in message["heads"]] == [h["role"] for h in rest["heads"]]
    assert [h["stats"]["entropy"] for h in message["heads"]] == \
        [h["stats"]["entropy"] for h in rest["heads"]]
