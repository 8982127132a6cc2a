"""History over REST: the index and data equal what was streamed and recorded."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time

import numpy as np
import pytest
import torch
from stream_support import Served, connect, run_async, small_encoder

from attnscope.contract.protocol import decode_frame
from attnscope.training.run import Run, RunRegistry
from transformer_core.events import EventDispatcher

STEPS = 24


class NudgingTrainer:
    """Same batch every step; the weights change *before* each forward, so the probe
    pass at the end of step i sees the weights that step i's stream frame saw."""

    def __init__(self, run: Run, model: torch.nn.Module, x: torch.Tensor) -> None:
        self.run, self.model, self.x = run, model, x
        self.go = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        gen = torch.Generator().manual_seed(3)
        self.go.wait(10)
        for i in range(STEPS):
            with torch.no_grad():
                for p in self.model.parameters():
                    p.add_(0.1 * torch.randn(p.shape, generator=gen))
                self.model(self.x)
            self.run.step(i, loss=1.0 / (i + 1))
            time.sleep(0.06)


@pytest.fixture
def served(tmp_path):
    dispatcher = EventDispatcher()
    model = small_encoder(dispatcher)  # 2 layers x 2 heads, d_model 8
    torch.manual_seed(1)
    x = torch.randn(2, 6, 8)
    registry = RunRegistry()
    run = registry.add(Run(model, run_id="toy"))
    with Served(registry, data_dir=tmp_path, history_every=1, history_probe_budget=None) as s:
        yield s, run, model, x


def test_rest_history_equals_what_was_streamed(served):
    s, run, model, x = served
    trainer = NudgingTrainer(run, model, x)
    frames: dict[tuple[int, int], np.ndarray] = {}
    stats: dict[tuple[int, int], dict] = {}

    async def body() -> None:
        ws = await connect(s.ws_url)
        await ws.send(json.dumps({"type": "subscribe", "run": "toy", "max_fps": 60,
                                  "kinds": ["attention", "head_stats"]}))
        trainer.thread.start()
        trainer.go.set()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and trainer.thread.is_alive():
            try:
                msg = await asyncio.wait_for(ws.recv(), 0.5)
            except TimeoutError:
                continue
            if isinstance(msg, bytes):
                header, array = decode_frame(msg)
                frames[(header["step"], header["layer"])] = array.astype(np.float32)
            else:
                data = json.loads(msg)
                if data["type"] == "head_stats":
                    stats[(data["step"], data["layer"])] = data
        await ws.close()

    run_async(body, timeout=40)
    trainer.thread.join(10)
    assert s.app.state.history.flush()
    index = s.http.get("/api/v1/runs/toy/history", params={"layer": 1}).json()
    assert [snap["step"] for snap in index["snapshots"]] == list(range(STEPS))
    assert index["stats"]["steps"] == list(range(STEPS))
    assert index["stats"]["scalars"]["loss"][3] == pytest.approx(0.25)

    data = np.load(io.BytesIO(s.http.get("/api/v1/runs/toy/history/data",
                                         params={"layer": 1, "heads": "0,1"}).content))
    assert data["attention"].shape == (STEPS, 2, 6, 6)  # (T, h, L, S)
    compared = 0
    for (step, layer), frame in frames.items():
        if layer == 1 and step < STEPS:
            np.testing.assert_allclose(data["attention"][step], frame, atol=2e-3)
            compared += 1
    assert compared >= STEPS // 2, f"only {compared} streamed frames to compare"

    compared = 0
    for (step, layer), message in stats.items():
        if layer == 1 and step < STEPS:
            assert index["stats"]["entropy"][step] == pytest.approx(message["entropy"], abs=1e-6)
            assert index["stats"]["max_weight"][step] == pytest.approx(message["max_weight"],
                                                                       abs=1e-6)
            compared += 1
    assert compared >= STEPS // 2

    # one snapshot as the page fetches it: a protocol frame of the recorded step
    frame = s.http.get("/api/v1/runs/toy/history/frame",
                       params={"layer": 1, "step": 5, "heads": "1"})
    header, array = decode_frame(frame.content)
    assert header["step"] == 5 and header["heads"] == [1] and array.shape == (1, 6, 6)
    np.testing.assert_allclose(array[0].astype(np.float32), data["attention"][5, 1], atol=1e-3)


def test_history_of_a_head_as_json_and_step_ranges(served):
    s, run, model, x = served
    trainer = NudgingTrainer(run, model, x)
    trainer.go.set()
    trainer._loop()
    assert s.app.state.history.flush()
    body = s.http.get("/api/v1/runs/toy/history/data",
                      params={"layer": 0, "heads": "1", "from": 5, "to": 9,
                              "format": "json"}).json()
    assert body["steps"] == [5, 6, 7, 8, 9]
    assert body["shape"] == [5, 1, 6, 6]
    rows = np.asarray(body["attention"])[:, 0].sum(-1)  # each query row sums to 1
    np.testing.assert_allclose(rows, 1.0, atol=1e-2)
    index = s.http.get("/api/v1/runs/toy/history", params={"from": 10, "to": 12}).json()
    assert [snap["step"] for snap in index["snapshots"]] == [10, 11, 12]
    listed = s.http.get("/api/v1/history").json()
    assert listed[0]["run"] == "toy" and listed[0]["live"] and listed[0]["snapshots"] == STEPS


def test_heads_lists_every_head_with_statistics_scores_and_roles(served):
    from attnscope.core.roles import ROLES
    from attnscope.core.stats import HEAD_STATISTICS

    s, run, model, x = served
    assert s.http.get("/api/v1/runs/nope/heads").status_code == 404
    early = s.http.get("/api/v1/runs/toy/heads")  # recorded, no step yet: empty, no 404
    assert early.status_code == 200 and early.json()["heads"] == []
    trainer = NudgingTrainer(run, model, x)
    trainer.go.set()
    trainer._loop()
    assert s.app.state.history.flush()
    body = s.http.get("/api/v1/runs/toy/heads").json()
    assert body["step"] == STEPS - 1 and body["layers"] == 2 and body["roles"] == list(ROLES)
    assert [(h["layer"], h["head"]) for h in body["heads"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    rows = s.app.state.history.store.stats(body["session"])
    for h in body["heads"]:
        assert set(h["stats"]) == set(HEAD_STATISTICS) and set(h["scores"]) == set(ROLES)
        stored = rows[-1].heads[h["layer"], :, h["head"]]
        assert h["stats"]["entropy"] == pytest.approx(float(stored[0]))
        # the probe snapshot every step gives induction scores to every row after the first
        assert 0.0 <= h["scores"]["induction"] <= 1.0
        assert h["scores"]["uniform"] == h["stats"]["uniform"]
        assert (h["role"] is None) == (h["since"] is None)
    tracker = s.app.state.history.roles.get(body["session"])
    assert [[h["role"] for h in body["heads"] if h["layer"] == k] for k in (0, 1)] == \
        tracker.roles
    past = s.http.get("/api/v1/runs/toy/heads", params={"step": 5}).json()
    assert past["step"] == 5 and all(e["step"] <= 5 for e in past["events"])
    assert past["heads"][0]["stats"]["entropy"] == pytest.approx(float(rows[5].heads[0, 0, 0]))
    for e in body["events"]:
        assert e["text"].startswith(f"step {e['step']}: L{e['layer']} H{e['head']} ")
    # a capture's metadata records the roles of that moment
    run.close()  # training is over: the capture runs at once, not between steps
    capture = s.http.post("/api/v1/captures", json={
        "run": "toy", "features": x[:1].tolist(), "kinds": ["attention"]})
    assert capture.status_code == 201, capture.text
    assert capture.json()["head_roles"] == {"step": STEPS - 1, "roles": tracker.roles,
                                            "since": tracker.since}
    # a past session is rebuilt from its stored rows: the same roles and events
    book = s.app.state.history.roles
    book.forget(body["session"])
    again = s.http.get("/api/v1/runs/toy/heads").json()
    assert [h["role"] for h in again["heads"]] == [h["role"] for h in body["heads"]]
    assert again["events"] == body["events"]


def test_history_errors_name_the_field(served):
    s, run, model, x = served
    assert s.http.get("/api/v1/runs/nope/history").status_code == 404
    empty = s.http.get("/api/v1/runs/toy/history")  # recorded, but no step yet: no 404
    assert empty.status_code == 200 and empty.json()["session"] is None
    assert empty.json()["snapshots"] == []
    trainer = NudgingTrainer(run, model, x)
    trainer.go.set()
    trainer._loop()
    assert s.app.state.history.flush()
    r = s.http.get("/api/v1/runs/toy/history", params={"layer": 7})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "layer"]
    r = s.http.get("/api/v1/runs/toy/history", params={"heads": "0,5"})
    assert r.status_code == 422 and "head 5 out of range" in r.json()["detail"][0]["msg"]
    r = s.http.get("/api/v1/runs/toy/history/frame", params={"step": -1})
    assert r.status_code == 404 and r.json()["detail"][0]["loc"] == ["query", "step"]
    r = s.http.get("/api/v1/runs/toy/history", params={"session": "abc"})
    assert r.status_code == 404


def test_run_ids_with_a_slash_and_past_runs_after_a_restart(tmp_path):
    dispatcher = EventDispatcher()
    model = small_encoder(dispatcher)
    x = torch.randn(2, 6, 8)
    registry = RunRegistry()
    run = registry.add(Run(model, run_id="alice/lr3e-4"))
    settings = {"data_dir": tmp_path, "history_every": 2, "history_probe_budget": None}
    with Served(registry, **settings) as s:
        trainer = NudgingTrainer(run, model, x)
        trainer.go.set()
        trainer._loop()
        assert s.app.state.history.flush()
        before = s.http.get("/api/v1/runs/alice/lr3e-4/history").json()
        assert [snap["step"] for snap in before["snapshots"]] == list(range(0, STEPS, 2))
    # A new server on the same data dir, without the run: its history is still served.
    with Served(RunRegistry(), **settings) as s:
        after = s.http.get("/api/v1/runs/alice/lr3e-4/history").json()
        assert after["session"] == before["session"]
        assert after["snapshots"] == before["snapshots"]
        assert after["stats"] == before["stats"]
        sessions = s.http.get("/api/v1/history").json()
        assert [(x["run"], x["live"]) for x in sessions] == [("alice/lr3e-4", False)]
