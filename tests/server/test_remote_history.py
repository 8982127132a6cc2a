"""History of remote runs: recorded in the training process, stored and served by the server."""

from __future__ import annotations

import io
import math
import time

import numpy as np
import pytest
import torch
from stream_support import Served
from test_remote import _ServedOn, wait_for

from attnscope import Dashboard
from attnscope.backend.history.store import StatRow
from attnscope.backend.remote.checks import RunBounds, check_history_stats
from attnscope.backend.remote.history import encode_stats
from attnscope.contract.wire import unpack_binary
from attnscope.training.demo import DemoConfig, DemoTraining
from attnscope.training.run import RunRegistry
from transformer_core.events import AttentionEvent, EventDispatcher, dispatching_to

CONFIG = DemoConfig(seq_len=8, n_symbols=10, n_layers=2, n_heads=2, d_head=4, feed_forward=16,
                    batch_size=4, device="cpu")


def _train(dash, training: DemoTraining, steps: int, sleep: float = 0.005) -> None:
    for _ in range(steps):
        result = training.step()
        dash.step(result.step, loss=result.loss, tokens=result.tokens)
        time.sleep(sleep)


def _index(served: Served, run: str) -> dict:
    """The run's history index; an empty one while nothing has arrived yet (404)."""
    served.app.state.history.flush()
    response = served.http.get(f"/api/v1/runs/{run}/history")
    if response.status_code == 404:
        return {"stats": {"steps": []}, "snapshots": []}
    assert response.status_code == 200, response.text
    return response.json()


def test_a_remote_run_is_recorded_and_its_snapshots_are_its_probe_attention() -> None:
    run = "carol/remote-history"
    training = DemoTraining(CONFIG)
    with Served(RunRegistry(), history_every=5, history_probe_budget=None) as served:
        # no budget to keep: every step recorded (a budget switches the dashboard off for
        # a few steps now and then, to measure what it costs)
        dash = Dashboard.connect(training.model, served.url, run=run,
                                 symbols=training.task.symbols, max_overhead=1.0)
        try:
            wait_for(lambda: dash.connections == 1, 10, "the connection")
            _train(dash, training, 21)  # steps 0..20; recording starts with the first step
            wait_for(lambda: (_index(served, run)["stats"]["steps"] or [0])[-1] == 20, 10,
                     "the last step's statistics")
            index = _index(served, run)
            probe = dash._link._recorder.probe
        finally:
            dash.close()
        assert index["stats"]["steps"] == list(range(0, 21))  # every step
        assert [s["step"] for s in index["snapshots"]] == [0, 5, 10, 15, 20]
        assert index["layers"] == 2 and index["heads"] == [0, 1]
        assert len(index["probe"]["labels"]) == CONFIG.seq_len
        sessions = {s["session"]: s for s in served.http.get("/api/v1/history").json()}
        assert sessions[index["session"]]["live"] is False  # the run ended
        data = served.http.get(f"/api/v1/runs/{run}/history/data?layer=1&from=20&to=20")
        assert data.status_code == 200
        with np.load(io.BytesIO(data.content)) as z:
            recorded = z["attention"][0]  # (P, H, L, S) -> the probe sample's (H, L, S)
    # The weights now are those after step 20: the probe's attention must match.
    args, kwargs = probe
    seen: list[torch.Tensor] = []
    private = EventDispatcher()
    private.listen(AttentionEvent, lambda e: seen.append(e.attention(sample=0)))
    training.model.eval()
    with torch.no_grad(), dispatching_to(training.model, private):
        training.model(*args, **kwargs)
    np.testing.assert_allclose(recorded.reshape(seen[1].shape), seen[1].numpy(), atol=2e-3)


def test_remote_history_continues_in_the_same_session_across_a_server_restart() -> None:
    run = "carol/restarted"
    training = DemoTraining(CONFIG)
    first = Served(RunRegistry())
    port = int(first.url.rsplit(":", 1)[1])
    dash = Dashboard.connect(training.model, first.url, run=run, max_overhead=1.0)
    try:
        with first:
            wait_for(lambda: dash.connections == 1, 10, "the connection")
            _train(dash, training, 15)
            wait_for(lambda: len(_index(first, run)["stats"]["steps"]) >= 14, 10, "stats")
            session = _index(first, run)["session"]
        _train(dash, training, 10)  # the server is away: recorded, waiting in the outbox
        with _ServedOn(RunRegistry(), port) as second:
            wait_for(lambda: dash.connections == 2, 30, "the reconnection")
            _train(dash, training, 10)
            wait_for(lambda: (_index(second, run)["stats"]["steps"] or [0])[-1] == 34, 10,
                     "the newest steps")
            index = _index(second, run)
    finally:
        dash.close()
    assert index["session"] == session
    assert index["stats"]["steps"] == list(range(0, 35))  # nothing lost while away
    assert dash.history_dropped == 0


@pytest.mark.parametrize("server_records, publisher_records", [(False, True), (True, False)])
def test_no_history_on_either_side_means_no_recording_in_the_trainer(
        server_records: bool, publisher_records: bool) -> None:
    training = DemoTraining(CONFIG)
    with Served(RunRegistry(), history_enabled=server_records) as served:
        dash = Dashboard.connect(training.model, served.url, run="carol/no-history",
                                 history=publisher_records)
        try:
            wait_for(lambda: dash.connections == 1, 10, "the connection")
            _train(dash, training, 5, sleep=0)
            assert dash._link._recorder is None
            assert not any(d.has_listeners for d in dash.run.dispatchers)  # zero cost
        finally:
            dash.close()
        if server_records:
            assert served.http.get("/api/v1/runs/carol/no-history/history").status_code == 404


def test_stats_rows_survive_the_wire_with_nan() -> None:
    heads = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
    heads[1, :, 2] = np.nan  # a layer with fewer heads
    rows = [StatRow(3, 1.5, {"loss": math.nan, "acc": 0.5}, heads),
            StatRow(4, 2.0, {"loss": 0.25}, None)]
    header, payload = unpack_binary(encode_stats("s1", rows))
    assert header["kind"] == "history_stats" and header["session"] == "s1"
    session, back = check_history_stats(RunBounds(layer_heads=(3, 2)), header, payload, 5)
    assert session == "s1"
    assert [(r.step, r.time) for r in back] == [(3, 1.5), (4, 2.0)]
    assert math.isnan(back[0].scalars["loss"]) and back[0].scalars["acc"] == 0.5
    np.testing.assert_array_equal(back[0].heads, heads)
    assert back[1].heads is None
