"""REST API and static files on a real uvicorn."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from stream_support import Served, Trainer, small_encoder

from attnscope.training.demo import DemoConfig
from attnscope.training.demo_run import DemoRun
from attnscope.training.run import Run, RunRegistry
from transformer_core.events import EventDispatcher

TINY_DEMO = DemoConfig(seq_len=8, n_symbols=4, n_layers=1, n_heads=2, d_head=8,
                       feed_forward=16, batch_size=16, device="cpu")


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.fixture
def toy():
    dispatcher = EventDispatcher()
    model = small_encoder(dispatcher)
    registry = RunRegistry()
    run = registry.add(Run(model, run_id="toy", name="toy run"))
    with Served(registry) as served:
        yield served, run, model


def test_health_and_runs(toy):
    served, run, model = toy
    assert served.http.get("/api/v1/health").json() == {"status": "ok", "version": "0.1.0",
                                                        "runs": 1}
    with Trainer(run, model, torch.randn(3, 5, 8)):
        assert wait_for(lambda: run.step_index is not None)
        [summary] = served.http.get("/api/v1/runs").json()
    assert summary["id"] == "toy" and summary["name"] == "toy run"
    assert summary["status"] == "live" and summary["step"] is not None
    assert served.http.get("/api/v1/runs/toy").json()["status"] == "ended"  # closed on exit
    model_info = summary["model"]
    assert (model_info["layers"], model_info["heads"], model_info["d_model"],
            model_info["seq_len"], model_info["attention_type"]) == (2, 2, 8, 5, "full")
    assert summary["started"].endswith("Z")
    assert served.http.get("/api/v1/runs/toy").json()["id"] == "toy"
    history = served.http.get("/api/v1/runs/toy/scalars").json()
    n = len(history["steps"])
    assert n >= 1 and history["steps"] == list(range(n)) and len(history["time"]) == n
    assert history["values"]["loss"] == pytest.approx([1 / (i + 1) for i in range(n)])
    assert served.http.get("/api/v1/runs/nope/scalars").status_code == 404


def test_unknown_run_is_404_naming_the_id(toy):
    served = toy[0]
    for method, path in (("GET", "/api/v1/runs/nope"), ("POST", "/api/v1/runs/nope/pause")):
        response = served.http.request(method, path)
        assert response.status_code == 404
        assert "nope" in response.json()["detail"]


def test_unsupported_or_impossible_control_is_409(toy):
    served, run, model = toy
    response = served.http.post("/api/v1/runs/toy/restart")
    assert response.status_code == 409
    assert "does not support restart" in response.json()["detail"]
    assert served.http.post("/api/v1/runs/toy/dance").status_code == 422
    run.close()
    response = served.http.post("/api/v1/runs/toy/pause")
    assert response.status_code == 409 and "has ended" in response.json()["detail"]


def test_pause_blocks_training_until_resume(toy):
    served, run, model = toy
    with Trainer(run, model, torch.randn(1, 4, 8)):
        assert wait_for(lambda: (run.step_index or 0) > 2)
        assert served.http.post("/api/v1/runs/toy/pause").json()["status"] == "paused"
        time.sleep(0.1)
        frozen = run.step_index
        time.sleep(0.3)
        assert run.step_index == frozen
        assert served.http.get("/api/v1/runs/toy").json()["status"] == "paused"
        assert served.http.post("/api/v1/runs/toy/resume").json()["status"] == "live"
        assert wait_for(lambda: run.step_index > frozen + 2)


def test_static_page_and_vendored_plotly(toy):
    served = toy[0]
    response = served.http.get("/vendor/plotly.min.js")
    assert response.status_code == 200
    assert "javascript" in response.headers["content-type"]
    assert len(response.content) > 1_000_000  # the real bundle, not a placeholder
    index = Path(__file__).resolve().parents[2] / "frontend" / "index.html"
    page = served.http.get("/")
    assert page.status_code == 200 and page.text == index.read_text()


def test_openapi_lists_the_routes(toy):
    paths = toy[0].http.get("/openapi.json").json()["paths"]
    assert {"/api/v1/health", "/api/v1/runs", "/api/v1/runs/{run_id}",
            "/api/v1/runs/{run_id}/{action}"} <= set(paths)


def test_demo_run_trains_pauses_restarts_and_loss_falls():
    demo = DemoRun(TINY_DEMO)
    registry = RunRegistry()
    registry.add(demo.run)
    losses: list[float] = []
    demo.run.add_step_hook(lambda run: losses.append(run.scalars["loss"]))
    with Served(registry) as served:
        demo.start()
        try:
            assert wait_for(lambda: len(losses) >= 150, timeout=60)
            summary = served.http.get("/api/v1/runs/demo").json()
            assert summary["controls"] == ["pause", "resume", "restart"]
            assert summary["model"]["seq_len"] == 8
            assert sum(losses[-20:]) / 20 < 0.8 * sum(losses[:20]) / 20
            history = served.http.get("/api/v1/runs/demo/scalars").json()
            assert len(history["steps"]) >= 150 and set(history["values"]) == {"loss", "accuracy"}
            assert history["values"]["loss"][-1] < history["values"]["loss"][0]
            assert served.http.post("/api/v1/runs/demo/restart").status_code == 200
            assert wait_for(lambda: demo.run.step_index is not None
                            and demo.run.step_index < 20 and len(losses) > 160)
            assert served.http.post("/api/v1/runs/demo/pause").json()["status"] == "paused"
        finally:
            demo.close()
        assert not demo.alive
        assert served.http.get("/api/v1/runs/demo").json()["status"] == "ended"


def test_training_exception_ends_the_run_and_server_keeps_serving():
    demo = DemoRun(TINY_DEMO)
    step = demo.training.step
    calls = []

    def failing_step():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("loss is NaN at step 2")
        return step()

    demo.training.step = failing_step
    registry = RunRegistry()
    registry.add(demo.run)
    with Served(registry) as served:
        demo.start()
        try:
            assert wait_for(lambda: demo.run.status == "ended")
            summary = served.http.get("/api/v1/runs/demo").json()
            assert summary["status"] == "ended"
            assert summary["error"] == "RuntimeError: loss is NaN at step 2"
            assert summary["step"] == 1
            assert served.http.get("/api/v1/health").status_code == 200
            # restart revives a failed demo
            demo.training.step = step
            assert served.http.post("/api/v1/runs/demo/restart").json()["status"] == "live"
            assert wait_for(lambda: (demo.run.step_index or 0) > 3)
            assert served.http.get("/api/v1/runs/demo").json()["error"] is None
        finally:
            demo.close()


def test_paced_demo_never_exceeds_its_rate_and_stops_promptly():
    demo = DemoRun(TINY_DEMO, max_rate=20)
    steps: list[float] = []
    demo.run.add_step_hook(lambda run: steps.append(time.monotonic()))
    demo.start()
    try:
        assert wait_for(lambda: len(steps) >= 5, timeout=30)
        time.sleep(1.0)
    finally:
        started = time.monotonic()
        demo.close()
        assert time.monotonic() - started < 2.0  # a pacing wait does not delay close()
    elapsed = steps[-1] - steps[0]
    assert len(steps) - 1 <= 20 * elapsed + 1  # at most 20 steps per second


def test_demo_rate_must_be_positive():
    with pytest.raises(ValueError, match="max_rate"):
        DemoRun(TINY_DEMO, max_rate=0)
