"""The cost budget on a served run: dashboard work made slow on purpose is thinned until
it fits, the REST and websocket status say what is thinned, and it recovers."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
import torch
from stream_support import Served, Trainer, connect, run_async, small_encoder

from attnscope.backend.history import writer as service_module
from attnscope.training.run import Run, RunRegistry
from attnscope.training.stream import Plan, SampleNeed, StreamTap
from transformer_core.events import EventDispatcher

SLOW_S = 0.02  # what each slowed call costs: far over a 5 % budget on a 100 ms step


@pytest.fixture
def slow(monkeypatch):
    """While ``on``: the history writer's statistics take SLOW_S more per recorded step
    (CPU in a helper thread), and each stream capture SLOW_S more (the training thread)."""
    state = {"on": True}
    rows, capture = service_module.stat_rows, StreamTap._capture_attention

    def busy(seconds: float) -> None:
        if state["on"]:
            end = time.thread_time() + seconds
            while time.thread_time() < end:
                pass

    def slow_rows(steps, *args, **kwargs):
        busy(SLOW_S * len(steps))
        return rows(steps, *args, **kwargs)

    def slow_capture(self, *args, **kwargs):
        busy(SLOW_S)
        return capture(self, *args, **kwargs)

    monkeypatch.setattr(service_module, "stat_rows", slow_rows)
    monkeypatch.setattr(StreamTap, "_capture_attention", slow_capture)
    return state


def wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


async def frames_per_second(ws, seconds: float) -> float:
    """Attention frames of layer 0 received per second over ``seconds`` (after what
    waited unread)."""
    while True:
        try:
            await asyncio.wait_for(ws.recv(), 0.01)
        except TimeoutError:
            break
    count, end = 0, time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        try:
            msg = await asyncio.wait_for(ws.recv(), left)
        except TimeoutError:
            break
        if isinstance(msg, bytes) and b'"attention"' in msg[:200] and b'"layer":0' in msg[:200]:
            count += 1
    return count / seconds


def test_slow_dashboard_work_is_thinned_to_the_budget_and_recovers(tmp_path, slow):
    dispatcher = EventDispatcher()
    model = small_encoder(dispatcher)
    x = torch.randn(2, 6, 8)
    registry = RunRegistry()
    run = registry.add(Run(model, run_id="toy", max_overhead=0.05))
    run.budget.window_s = 1.0  # decide every second: a short test
    budget = run.budget
    with Served(registry, data_dir=tmp_path) as served, \
            Trainer(run, model, x, tokens=[list("abcdef")] * 2, period=0.1):

        async def body() -> tuple[float, float, dict, int, int]:
            ws = await connect(served.ws_url)
            await ws.send('{"type": "subscribe", "run": "toy", "max_fps": 20,'
                          ' "kinds": ["attention", "head_stats", "scalars"]}')
            thinned = await asyncio.to_thread(
                wait_for, lambda: budget.stats_every > 1 and budget.stream_factor > 1, 15)
            assert thinned, (budget.levels, budget.status())
            # Thinned until the overhead it reports is near the budget.
            near = await asyncio.to_thread(wait_for, lambda: budget.overhead is not None
                                           and budget.overhead <= 0.10, 15)
            assert near, (budget.levels, budget.status())
            slowed = budget.stream_factor
            slow_rate = await frames_per_second(ws, 5.0)
            message = None
            deadline = time.monotonic() + 5
            while message is None or "to stay under 5 %" not in message["text"]:
                assert time.monotonic() < deadline, message
                raw = await asyncio.wait_for(ws.recv(), 5)
                if isinstance(raw, str) and '"budget"' in raw:
                    message = json.loads(raw)
            slow["on"] = False
            # Well under budget now: the stream (thinned last) is restored first, a level a window.
            recovered = await asyncio.to_thread(
                wait_for, lambda: budget.stream_factor <= slowed // 2, 30)
            assert recovered, (slowed, budget.levels, budget.status())
            fast_rate = await frames_per_second(ws, 5.0)
            await ws.close()
            return slow_rate, fast_rate, message, slowed, budget.stream_factor

        slow_rate, fast_rate, message, slowed, now = run_async(body, timeout=90)
        status = served.http.get("/api/v1/runs/toy").json()["budget"]
        assert served.app.state.history.flush()
        store = served.app.state.history.store
        steps = np.array([row.step for row in store.stats(store.latest_session("toy").id)])

    # Over budget the stream was slowed, and the websocket said what was thinned.
    assert message["run"] == "toy" and message["max_overhead"] == 0.05
    assert "stats every" in message["text"] and "stream frames at 1/" in message["text"]
    assert message["thinned"]["stats_every"] > 1 and message["thinned"]["stream_factor"] > 1
    # Recovering: frames come faster again; the REST status says where it stands now.
    assert slow_rate <= 20 / slowed + 0.5, (slow_rate, slowed)  # 20 fps asked for
    assert slow_rate * 1.3 < fast_rate, (slow_rate, fast_rate, slowed, now)
    assert status["thinned"]["stream_factor"] <= slowed // 2
    assert status["max_overhead"] == 0.05 and status["text"]
    # The history recorded statistics every k > 1 steps while thinned.
    gaps = np.diff(steps)
    assert gaps.max() > 1 and (gaps == 1).any(), steps


def test_stream_thinning_skips_steps_when_steps_are_slower_than_the_frame_interval() -> None:
    """At 1/4 of the rate, a run whose steps (200 ms) are slower than the frame interval
    (20 ms) gets a frame every 4th step: a rate set in seconds alone would still capture
    at every step, and thinning would save nothing on a big model."""
    model = small_encoder(EventDispatcher()).eval()
    run = Run(model, run_id="slow", max_overhead=None)  # levels set by hand below
    run.budget.levels["stream"] = 2  # frames at 1/4
    publisher = StreamTap(run, notify=lambda _: None)
    published: set[int] = set()
    run.add_step_hook(lambda r: published.update(
        [publisher.slots[("attention", 0, 0)].step] if publisher.slots else []))
    x = torch.randn(1, 6, 8)
    for step in range(13):
        if step == 2:  # watched once a step's time is known (from the second step on)
            publisher.set_plan(Plan(interval=0.02, sources=frozenset({("attn", 0)}),
                                    needs={0: (SampleNeed(0, attention=True),)}))
        time.sleep(0.2)  # a slow training step
        with torch.no_grad():
            model(x)
        run.step(step, loss=1.0)
    publisher.close()
    assert sorted(published) == [2, 6, 10]


def test_a_restored_stream_rate_takes_effect_at_once() -> None:
    """Thinned to every 16th step, then restored: the next step is captured, not 16 steps
    after the last capture (a viewer would see a frozen heatmap for minutes on a big model)."""
    model = small_encoder(EventDispatcher()).eval()
    run = Run(model, run_id="restored", max_overhead=None)
    run.budget.levels["stream"] = 4  # frames at 1/16
    publisher = StreamTap(run, notify=lambda _: None)
    published: list[int] = []  # the step of the frame on show after each step
    x = torch.randn(1, 6, 8)
    for step in range(8):
        if step == 2:
            publisher.set_plan(Plan(interval=0.02, sources=frozenset({("attn", 0)}),
                                    needs={0: (SampleNeed(0, attention=True),)}))
        if step == 5:
            run.budget.levels["stream"] = 0  # restored
        time.sleep(0.2)
        with torch.no_grad():
            model(x)
        run.step(step, loss=1.0)
        published.append(publisher.slots[("attention", 0, 0)].step if publisher.slots else -1)
    publisher.close()
    assert published == [-1, -1, 2, 2, 2, 5, 6, 7]


def test_a_slowdown_cpu_time_cannot_see_is_measured_and_thinned(monkeypatch) -> None:
    """The history's handler sleeps 4 ms per layer (time no CPU accounting counts: a GIL
    held elsewhere, kernels on a device look like this to the training thread): the
    budget's off windows measure the slowdown, report it and thin the statistics."""
    from attnscope.core.history_config import HistoryConfig
    from attnscope.training.recorder import RunRecorder

    original = RunRecorder._on_attention

    def hidden(self, event):
        if not self._budget.off and self._stats_due:
            time.sleep(0.004)
        return original(self, event)

    monkeypatch.setattr(RunRecorder, "_on_attention", hidden)

    class Sink:  # the records themselves go nowhere: only the training side is measured
        config = HistoryConfig()

        def new_session(self, run_id, name, meta):
            return "s"

        def submit(self, item):
            return True

    model = small_encoder(EventDispatcher()).eval()
    run = Run(model, run_id="hidden", max_overhead=0.03)
    run.budget.window_s = 0.2
    RunRecorder(run, Sink())
    x = torch.randn(1, 6, 8)
    for step in range(240):
        with torch.no_grad():
            model(x)
        time.sleep(0.02)  # the training step's own work
        run.step(step, loss=1.0)
    status = run.budget.status()
    # 2 layers x 4 ms on 20 ms steps: 40 % unthinned, invisible to CPU accounting
    assert status["cpu_overhead"] < 0.05, status
    assert status["measured"] is not None or status["source"] == "calibrated", status
    assert run.budget.stats_every >= 4, status
    assert "stats every" in status["text"]


def test_a_viewer_lifts_the_limit_from_the_idle_one() -> None:
    """Nobody watching: the history alone is held to the idle limit (1 %); once the stream
    has a plan (a page or client subscribed), the run's budget (3 %) is in force, and the
    status the page shows says which."""
    model = small_encoder(EventDispatcher()).eval()
    run = Run(model, run_id="watched", max_overhead=0.03, idle_overhead=0.01)
    publisher = StreamTap(run, notify=lambda _: None)
    limits = []
    for step in range(4):
        if step == 1:
            publisher.set_plan(Plan(interval=0.02, sources=frozenset({("attn", 0)}),
                                    needs={0: (SampleNeed(0, attention=True),)}))
        if step == 3:
            publisher.set_plan(Plan())  # the viewer left
        run.step(step, loss=1.0)
        status = run.budget.status()
        limits.append((status["limit"], status["watched"]))
    publisher.close()
    assert limits == [(0.01, False), (0.03, True), (0.03, True), (0.01, False)]


def _listened(run: Run) -> list[bool]:
    """Whether layer 0's dispatcher had a listener during each training forward pass (the
    probe's passes, under no_grad, are left out)."""
    seen: list[bool] = []
    site = run.local.sites[0]
    site.module.register_forward_pre_hook(
        lambda module, args: seen.append(site.dispatcher.has_listeners)
        if torch.is_grad_enabled() else None)
    return seen


def test_the_history_listens_only_on_steps_whose_statistics_are_due() -> None:
    """Statistics thinned to every 4th step: on the steps between, nothing listens to the
    model's attention, so it runs its fused kernels and makes no event at all."""
    from attnscope.core.history_config import HistoryConfig
    from attnscope.training.recorder import RunRecorder

    class Sink:
        config = HistoryConfig()

        def new_session(self, run_id, name, meta):
            return "s"

        def submit(self, item):
            return True

    model = small_encoder(EventDispatcher())
    run = Run(model, run_id="quiet", max_overhead=None)
    run.budget.levels["stats"] = 2  # every 4 steps
    recorder = RunRecorder(run, Sink())
    listened = _listened(run)
    x = torch.randn(1, 6, 8)
    for step in range(8):
        model(x)
        run.step(step, loss=1.0)
    assert listened == [True, False, False, False, True, False, False, False]
    recorder.detach()
    model(x)
    assert listened[-1] is False


def test_the_stream_listens_only_during_passes_it_captures() -> None:
    """Watched at one frame per 100 s: the first pass is captured, the next ones are not
    listened to; at one frame per pass, every pass is."""
    model = small_encoder(EventDispatcher())
    run = Run(model, run_id="gated", max_overhead=None)
    publisher = StreamTap(run, notify=lambda _: None)
    listened = _listened(run)
    x = torch.randn(1, 6, 8)
    needs = {0: (SampleNeed(0, attention=True),)}
    published = []
    for step in range(8):
        if step == 0:
            publisher.set_plan(Plan(interval=100.0, sources=frozenset({("attn", 0)}),
                                    needs=needs))
        if step == 4:
            publisher.set_plan(Plan(interval=0.0, sources=frozenset({("attn", 0)}),
                                    needs=needs))
        model(x)
        run.step(step, loss=1.0)
        published.append(publisher.slots[("attention", 0, 0)].step)
    assert listened == [True, False, False, False, True, True, True, True]
    assert published == [0, 0, 0, 0, 4, 5, 6, 7]
    publisher.close()
    model(x)
    assert listened[-1] is False and not run.local.sites[0].dispatcher.has_listeners
