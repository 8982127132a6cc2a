"""The collapse demo: its attention collapses under a rising learning rate, and the
history's alerts say so before the loss spikes."""

from __future__ import annotations

import logging
import math
import statistics
import time

import pytest
import torch

from attnscope.backend.history.store import HistoryStore
from attnscope.backend.history.writer import HistoryWriter
from attnscope.core.history_config import HistoryConfig
from attnscope.training.collapse import CollapseConfig, CollapseTraining
from attnscope.training.demo_run import DemoRun
from attnscope.training.run import Run
from transformer_core.events import EventDispatcher


def test_the_rate_is_steady_then_grows_then_stops():
    training = CollapseTraining(CollapseConfig(seq_len=8, batch_size=2, device="cpu",
                                               steady_steps=2, lr_growth=2.0, lr_max=0.005))
    rates = [training.step().lr for _ in range(6)]
    assert rates == [1e-3, 1e-3, 1e-3, 2e-3, 4e-3, 5e-3]
    training.reset()
    assert training.steps_done == 0 and training.lr == 1e-3


@pytest.mark.parametrize("field, value", [("lr_growth", 0.0), ("vocab", 1), ("lr", math.inf)])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        CollapseConfig(**{field: value}).validate()


def test_the_demo_run_reports_the_learning_rate():
    demo = DemoRun(CollapseConfig(seq_len=8, batch_size=2, device="cpu"), task="collapse")
    demo.start()
    try:
        for _ in range(400):  # 20 s at most
            if demo.run.step_index is not None and demo.run.step_index >= 2:
                break
            assert demo.alive
            time.sleep(0.05)
        assert demo.run.scalars["lr"] == pytest.approx(1e-3)
        assert "entropy collapse" in demo.run.name
    finally:
        demo.close()


@pytest.mark.slow
def test_an_entropy_alert_comes_before_the_loss_spikes(tmp_path):
    logging.getLogger("attnscope.backend.alerts").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    config = CollapseConfig(device="cpu")
    training = CollapseTraining(config, event_dispatcher=EventDispatcher())
    run = Run(training.model, run_id="collapse", max_overhead=None)
    service = HistoryWriter(HistoryStore(tmp_path), HistoryConfig())
    losses: list[float] = []
    try:
        service.attach(run)
        for _ in range(330):
            result = training.step()
            run.step(result.step, loss=result.loss)
            losses.append(result.loss)
        assert service.flush(60)
        alerts = service.store.alerts(service.session_of("collapse"))
    finally:
        service.close()
    spike = next(s for s in range(config.steady_steps, len(losses))
                 if losses[s] > 1.2 * statistics.median(losses[s - 50: s]))
    first = next(a for a in alerts if "entropy" in a["rule"])
    assert config.steady_steps < first["step"] < spike, (first, spike)
    assert not [a for a in alerts if a["step"] < first["step"]]  # nothing before: no noise


def test_on_alert_calls_the_training_script_back_in_its_own_thread(tmp_path):
    """dash.on_alert: the server process's alert reaches the training loop, which may react
    (here: it halves the learning rate), in the training thread, at a step."""
    import threading

    from attnscope import Dashboard
    from attnscope.settings import Settings

    logging.getLogger("attnscope.backend.alerts").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    config = CollapseConfig(device="cpu")
    training = CollapseTraining(config, event_dispatcher=EventDispatcher())
    settings = Settings(data_dir=tmp_path, max_overhead=1.0)  # every step recorded
    got: list[tuple[dict, int]] = []
    with Dashboard.start(training.model, port=0, quiet=True, name="collapse",
                         settings=settings) as dash:
        @dash.on_alert
        def react(alert: dict) -> None:
            got.append((alert, threading.get_ident()))

        for _ in range(330):
            result = training.step()
            dash.step(result.step, loss=result.loss)
            if got:
                break
        for _ in range(60):  # the server process's writer may lag: keep serving meanwhile
            if got:
                break
            dash.wait(timeout=1.0)
    assert got, "no alert reached the training script"
    alert, thread = got[0]
    assert thread == threading.get_ident()
    assert "entropy" in alert["rule"] and alert["run"] == "collapse" and alert["text"]
    assert config.steady_steps < alert["step"] <= result.step


def test_on_alert_reaches_a_publisher_of_a_team_server(tmp_path):
    """Dashboard.connect: the team server's alerts of the run reach its training script."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from stream_support import Served

    from attnscope import Dashboard
    from attnscope.training.run import RunRegistry

    logging.getLogger("attnscope.backend.alerts").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    config = CollapseConfig(device="cpu")
    training = CollapseTraining(config, event_dispatcher=EventDispatcher())
    got: list[dict] = []
    with Served(RunRegistry(), data_dir=tmp_path) as served:
        dash = Dashboard.connect(training.model, served.url, run="team/collapse",
                                 max_overhead=1.0)
        try:
            dash.on_alert(got.append)
            for _ in range(330):
                result = training.step()
                dash.step(result.step, loss=result.loss)
                if got:
                    break
            for _ in range(120):  # the server's writer may lag: the relay forwards meanwhile
                if got:
                    break
                time.sleep(0.5)
                dash.step(result.step + 1, loss=result.loss)  # alerts arrive at a step
        finally:
            dash.close()
    assert got and got[0]["run"] == "team/collapse" and "entropy" in got[0]["rule"]
