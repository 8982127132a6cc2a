"""Runs outlive their process: what a data dir recorded is listed and opened by any later
server on it (``attnscope serve --data-dir DIR``), and deleting a run deletes its data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from stream_support import Served, connect, recv_json, run_async, small_encoder
from test_remote import wait_for

from attnscope import Dashboard
from attnscope.training.run import Run, RunRegistry
from transformer_core.events import EventDispatcher

ROOT = Path(__file__).resolve().parents[2]
STEPS = 20
SETTINGS = {"history_every": 2, "history_probe_budget": None}


def record_local_run(data_dir: Path, run_id: str = "toy") -> dict:
    """Train ``run_id`` for STEPS steps under a server on ``data_dir``, capture once after
    it ended, stop the server; the run's summary as that server listed it."""
    model = small_encoder(EventDispatcher())  # 2 layers x 2 heads
    x = torch.randn(2, 6, 8)
    registry = RunRegistry()
    run = registry.add(Run(model, run_id=run_id, name="Toy run"))
    with Served(registry, data_dir=data_dir, **SETTINGS) as s:
        for step in range(STEPS):
            with torch.no_grad():
                model(x)
            run.step(step, loss=1.0 / (step + 1))
        run.close()
        assert s.app.state.history.flush()
        made = s.http.post("/api/v1/captures", json={"run": run_id, "features": x[:1].tolist()})
        assert made.status_code == 201, made.text
        return s.http.get(f"/api/v1/runs/{run_id}").json()


def test_a_closed_run_is_listed_by_a_later_server_and_opens_with_its_history(tmp_path):
    live = record_local_run(tmp_path)
    with Served(RunRegistry(), data_dir=tmp_path, **SETTINGS) as s:
        [run] = s.http.get("/api/v1/runs").json()
        assert (run["id"], run["name"], run["status"], run["step"]) == \
            ("toy", "Toy run", "ended", STEPS - 1)
        assert run["started"][:10] == live["started"][:10] and run["session"]
        assert (run["model"]["layers"], run["model"]["heads"]) == (2, 2)
        scalars = s.http.get("/api/v1/runs/toy/scalars").json()
        assert scalars["steps"] == list(range(STEPS))
        assert scalars["values"]["loss"] == pytest.approx([1 / (i + 1) for i in range(STEPS)])
        index = s.http.get("/api/v1/runs/toy/history").json()
        assert index["session"] == run["session"]
        assert [x["step"] for x in index["snapshots"]] == list(range(0, STEPS, 2))
        heads = s.http.get("/api/v1/runs/toy/heads", params={"step": 10}).json()
        assert heads["step"] == 10 and len(heads["heads"]) == 4
        frame = s.http.get("/api/v1/runs/toy/history/frame", params={"step": 19, "layer": 1})
        assert frame.status_code == 200
        refused = s.http.post("/api/v1/captures", json={"run": "toy", "features": [[[0.0] * 8]]})
        assert refused.status_code == 409 and "has ended" in refused.text

        async def page() -> tuple[dict, dict]:
            ws = await connect(s.ws_url)  # as the page does: hello lists it, roles come
            await ws.send(json.dumps({"type": "subscribe", "run": "toy",
                                      "kinds": ["attention", "head_roles"]}))
            heads = await recv_json(ws, "heads")
            await ws.send(json.dumps({"type": "subscribe", "run": "nope", "kinds": ["scalars"]}))
            error = await recv_json(ws, "error")
            await ws.close()
            return heads, error

        heads, error = run_async(page)
        assert heads["run"] == "toy" and heads["step"] == STEPS - 1
        assert "known runs: toy" in error["message"]


def test_a_run_whose_statistics_were_thinned_reopens_at_its_last_step(tmp_path):
    """Statistics every 8 steps (the budget thinned them): the last recorded row is step 16,
    but the run ended at step 19, and a later server says so."""
    model = small_encoder(EventDispatcher())
    registry = RunRegistry()
    run = registry.add(Run(model, run_id="thin", max_overhead=None))
    run.budget.levels["stats"] = 3  # every 8 steps
    with Served(registry, data_dir=tmp_path, **SETTINGS) as s:
        for step in range(STEPS):
            with torch.no_grad():
                model(torch.randn(2, 6, 8))
            run.step(step, loss=1.0)
        run.close()
        assert s.app.state.history.flush()
        store = s.app.state.history.store
        rows = [r.step for r in store.stats(store.latest_session("thin").id)]
        assert rows[-1] < STEPS - 1, rows
    with Served(RunRegistry(), data_dir=tmp_path, **SETTINGS) as s:
        [listed] = s.http.get("/api/v1/runs").json()
        assert (listed["id"], listed["status"], listed["step"]) == ("thin", "ended", STEPS - 1)


def test_serve_data_dir_lists_the_recorded_runs(tmp_path):
    record_local_run(tmp_path / "runs", "alice/lr3e-4")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "ATTNSCOPE_DATA_DIR"}
    proc = subprocess.Popen([sys.executable, "-m", "attnscope.cli", "serve", "--port", str(port),
                             "--data-dir", str(tmp_path / "runs")], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _answers(url + "/api/v1/health"), 60, "attnscope serve")
        [run] = httpx.get(url + "/api/v1/runs").json()
        assert (run["id"], run["status"], run["step"]) == ("alice/lr3e-4", "ended", STEPS - 1)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert f"runs recorded in {tmp_path / 'runs'} are listed on the page" in out


def test_deleting_a_run_deletes_its_history_and_captures(tmp_path):
    record_local_run(tmp_path)
    with Served(RunRegistry(), data_dir=tmp_path, **SETTINGS) as s:
        assert s.http.get("/api/v1/captures", params={"run": "toy"}).json()["total"] == 1
        assert s.http.delete("/api/v1/runs/toy").status_code == 204
        assert s.http.get("/api/v1/runs").json() == []
        assert s.http.get("/api/v1/history").json() == []
        assert s.http.get("/api/v1/captures", params={"run": "toy"}).json()["total"] == 0
        assert s.http.get("/api/v1/runs/toy/history").status_code == 404
    assert list((tmp_path / "history" / "files").iterdir()) == []
    with Served(RunRegistry(), data_dir=tmp_path, **SETTINGS) as s:
        assert s.http.get("/api/v1/runs").json() == []


def test_a_remote_run_nobody_watched_stays_listed_and_can_be_taken_over(tmp_path, capsys):
    model = small_encoder(EventDispatcher())
    x = torch.randn(2, 6, 8)
    with Served(RunRegistry(), data_dir=tmp_path, history_every=5,
                history_probe_budget=None) as s:
        # no budget: every step recorded (the last one is what the list shows)
        dash = Dashboard.connect(model, s.url, run="bob/nobody-watched", max_overhead=1.0)
        wait_for(lambda: dash.connections == 1, 10, "the publisher")
        for step in range(30):
            with torch.no_grad():
                model(x)
            dash.step(step, loss=0.5)
            time.sleep(0.01)
        dash.close()
        assert f"stays browsable at {s.url}/?run=bob/nobody-watched" in capsys.readouterr().out
        wait_for(lambda: s.http.get("/api/v1/runs/bob/nobody-watched").json()["status"]
                 == "ended", 10, "the run to end")
        assert s.app.state.history.flush()
        snapshots = s.http.get("/api/v1/runs/bob/nobody-watched/history").json()["snapshots"]
        assert len(snapshots) >= 5
    with Served(RunRegistry(), data_dir=tmp_path, history_every=5,
                history_probe_budget=None) as s:
        [run] = s.http.get("/api/v1/runs").json()
        assert (run["id"], run["status"], run["step"]) == ("bob/nobody-watched", "ended", 29)
        again = s.http.get("/api/v1/runs/bob/nobody-watched/history").json()["snapshots"]
        assert again == snapshots
        # A publisher under the same id takes the recorded run over, as an ended remote one.
        # no budget: every step recorded (the last one is what the list shows)
        dash = Dashboard.connect(model, s.url, run="bob/nobody-watched", max_overhead=1.0)
        try:
            wait_for(lambda: dash.connections == 1, 10, "the publisher")
            wait_for(lambda: s.http.get("/api/v1/runs").json()[0]["status"] == "live", 10,
                     "the run to be live again")
        finally:
            dash.close()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).is_success
    except httpx.TransportError:
        return False
