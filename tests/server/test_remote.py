"""Remote publishing: a training process publishes to a server; viewers see its frames."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import websockets
from auth_support import BEARER, TOKEN
from stream_support import Served, recv_frame, recv_json, run_async, small_encoder

from attnscope import Dashboard
from attnscope.backend.relay import STEPS_PERIOD_S, Relay
from attnscope.backend.remote.run import RemoteRun
from attnscope.contract.wire import decode_capture, unpack_binary
from attnscope.training.run import RunRegistry
from attnscope.training.stream import Capture
from transformer_core.events import EventDispatcher

ROOT = Path(__file__).resolve().parents[2]
RUN = "alice/lr3e-4"


def wait_for(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


async def viewer(url: str, headers: dict[str, str]):
    ws = await websockets.connect(url, additional_headers=headers, max_size=None)
    assert json.loads(await ws.recv())["type"] == "hello"
    return ws


def _runs(served: Served) -> dict[str, dict]:
    return {r["id"]: r for r in served.http.get("/api/v1/runs", headers=BEARER).json()}


def test_subprocess_publisher_reaches_a_viewer_with_only_what_is_subscribed() -> None:
    registry = RunRegistry()
    with Served(registry, token=TOKEN) as served:
        # PYTHONFAULTHANDLER: SIGABRT prints every thread's stack (if it ever hangs)
        env = {**os.environ, "ATTNSCOPE_TOKEN": TOKEN, "OMP_NUM_THREADS": "1",
               "PYTHONFAULTHANDLER": "1"}
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / "train_remote.py"), "--url", served.url,
             "--run-id", RUN, "--sleep", "0.02", "--seq-len", "16", "--device", "cpu"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # Read its log as it comes: a full pipe would block the child in a write.
        log: list[str] = []
        reader = threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True)
        reader.start()
        try:
            wait_for(lambda: RUN in _runs(served) and _runs(served)[RUN]["step"] is not None,
                     60, "the remote run")
            summary = _runs(served)[RUN]
            assert summary["status"] == "live" and summary["model"]["layers"] == 1
            assert summary["host"].endswith(f":{proc.pid}")
            run = registry.get(RUN)
            assert isinstance(run, RemoteRun)

            async def body() -> None:
                ws = await viewer(served.ws_url, BEARER)
                await ws.send(json.dumps({"type": "subscribe", "run": RUN, "kinds": ["scalars"]}))
                assert (await recv_json(ws, "subscribed"))["kinds"] == ["scalars"]
                scalars = await recv_json(ws, "scalars", timeout=10)
                assert set(scalars["values"]) == {"loss", "accuracy"}
                await asyncio.sleep(0.5)
                # Nobody asked for attention: the trainer sent none.
                assert run.proxy is not None and not run.proxy.slots
                await ws.send(json.dumps({"type": "subscribe", "run": RUN,
                                          "kinds": ["attention", "head_stats"], "heads": [1, 3]}))
                await recv_json(ws, "subscribed")
                header, array = await recv_frame(ws, "attention", 0, timeout=10)
                assert header["heads"] == [1, 3] and array.shape == (2, 16, 16)
                assert header["labels"]["queries"][0].isalpha()
                assert abs(float(array.astype("float32").sum()) - 2 * 16) < 0.1  # softmax rows
                stats = await recv_json(ws, "head_stats", timeout=10)
                assert stats["heads"] == [0, 1, 2, 3] and 0 <= stats["entropy"][0] <= 1
                await ws.close()

            run_async(body, timeout=60)
            proc.send_signal(signal.SIGINT)  # the script closes its dashboard on Ctrl-C
            try:
                code = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGABRT)  # its threads' stacks, to stderr
                proc.wait(10)
                reader.join(5)
                pytest.fail("the publisher did not exit within 60 s of Ctrl-C:\n" + "".join(log))
            reader.join(5)
            assert code == 0, "".join(log)
            wait_for(lambda: _runs(served)[RUN]["status"] == "ended", 10, "ended")
            assert _runs(served)[RUN]["error"] is None
            # The run stays listed, with its history.
            history = registry.get(RUN).history.to_dict()
            assert len(history["steps"]) >= 5 and history["steps"][0] == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            reader.join(5)
            proc.stderr.close()


class _Loop:
    """A training loop in a thread: forward + backward + ``dash.step`` as fast as it can."""

    def __init__(self, dash, model, x, sleep: float = 0.0) -> None:
        self.dash, self.model, self.x, self.sleep = dash, model, x, sleep
        self.step = 0
        self.longest = 0.0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            self.model(self.x).sum().backward()
            self.dash.step(self.step, loss=1.0 / (self.step + 1))
            self.longest = max(self.longest, time.perf_counter() - t0)
            self.step += 1
            time.sleep(self.sleep)

    def __enter__(self) -> _Loop:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join(10)


class _ServedOn(Served):
    """Served on a given port (to restart a server where publishers expect it)."""

    def __init__(self, registry: RunRegistry, port: int, **settings) -> None:
        from attnscope.backend.app import create_app
        from attnscope.backend.serving import BackgroundServer
        from attnscope.settings import Settings

        self.settings = Settings(port=port, **settings)
        self.app = create_app(self.settings, registry)
        self.server = BackgroundServer(self.app, self.settings)
        self.url = self.server.url
        self.ws_url = self.url.replace("http://", "ws://") + "/ws"
        self.http = httpx.Client(base_url=self.url, timeout=10)


def test_publisher_survives_a_server_restart_and_history_continues() -> None:
    model = small_encoder(EventDispatcher())
    x = torch.randn(2, 6, 8)
    first = Served(RunRegistry(), token=TOKEN)
    port = int(first.url.rsplit(":", 1)[1])
    dash = Dashboard.connect(model, first.url, run=RUN, token=TOKEN)
    loop = _Loop(dash, model, x, sleep=0.01)
    loop.__enter__()  # trains across both servers
    try:
        with first:
            wait_for(lambda: ((_runs(first).get(RUN) or {}).get("step") or 0) >= 5, 20, "steps")
        before = loop.step
        time.sleep(1.0)  # the server is gone; training goes on, never waiting for it
        assert loop.step > before + 20
        assert not dash.connected.is_set()
        registry = RunRegistry()
        with _ServedOn(registry, port, token=TOKEN) as second:
            wait_for(lambda: RUN in _runs(second) and _runs(second)[RUN]["status"] == "live",
                     30, "the reconnection")
            assert dash.connections == 2
            history = registry.get(RUN).history.to_dict()
            assert history["steps"][0] == 0  # what the first server saw, then more
            assert history["steps"][-1] > before

            async def body() -> None:
                ws = await viewer(second.ws_url, BEARER)
                await ws.send(json.dumps({"type": "subscribe", "run": RUN,
                                          "kinds": ["attention"], "layers": [1]}))
                header, array = await recv_frame(ws, "attention", 1, min_step=before, timeout=10)
                assert array.shape == (2, 6, 6)
                await ws.close()

            run_async(body, timeout=30)
            loop.__exit__()
            dash.close()
            wait_for(lambda: _runs(second)[RUN]["status"] == "ended", 10, "ended")
    finally:
        loop.__exit__()
        dash.close()
    assert loop.longest < 0.5  # no step waited on the network


def _dead_url() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _steps_per_second(model, x, dash, seconds: float = 0.6) -> float:
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        model(x).sum().backward()
        if dash is not None:
            dash.step(steps, loss=0.5)
        steps += 1
    return steps / (time.perf_counter() - t0)


def test_unreachable_server_trains_at_full_speed() -> None:
    model = small_encoder(EventDispatcher())
    x = torch.randn(4, 16, 8)
    t0 = time.perf_counter()
    dash = Dashboard.connect(model, _dead_url(), run="nowhere", token=TOKEN)
    # connecting takes the relay process's start, never the network's time
    assert time.perf_counter() - t0 < 15.0
    try:
        # Training speed itself is measured by bench/remote.py, not in a unit test:
        # here, the check is that step() never touches the network.
        _steps_per_second(model, x, dash, 0.3)
        # What step() itself costs while the server is unreachable: microseconds.
        costs = []
        for _ in range(5):
            t0 = time.perf_counter()
            for i in range(1000):
                dash.step(i, loss=0.5)
            costs.append((time.perf_counter() - t0) / 1000)
        assert min(costs) < 1e-3, costs  # microseconds in fact; a network wait is ms+
        assert not dash.connected.is_set() and dash.connections == 0
    finally:
        t0 = time.perf_counter()
        dash.close()
    assert time.perf_counter() - t0 < 2.0


def test_wrong_token_publishes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    registry = RunRegistry()
    model = small_encoder(EventDispatcher())
    with Served(registry, token=TOKEN) as served, \
            caplog.at_level("ERROR", logger="attnscope.training.connect"):
        dash = Dashboard.connect(model, served.url, run=RUN, token="wrong-token-0123456789")
        try:
            # the relay's report reaches this process's log at a step (or any read of dash)
            wait_for(lambda: dash.step(0) or "check the token" in caplog.text, 10, "the refusal")
            assert registry.ids() == []
        finally:
            dash.close()
    assert "wrong-token" not in caplog.text


def test_outgoing_buffer_drops_the_oldest() -> None:
    """The relay keeps at most ``buffer_frames`` frames for a slow or absent server."""
    from attnscope.contract.channel import Channel
    from attnscope.contract.messages import frames_message

    a = Channel.create(1 << 20)
    b = Channel.attach(a.child_fds(), side="server")
    relay = Relay(b, {"url": _dead_url(), "buffer_frames": 2},
                  {"run": "buffered", "name": "buffered", "model": {}, "history": None})
    relay.connected = True  # as if connected: frames are kept for the next flush
    caps = [Capture("attention", layer % 2, layer, (0, 1), torch.rand(2, 3, 3).half(),
                    "self", time.time(), step=layer, seq=layer + 1) for layer in range(3)]
    header, tensors = frames_message(caps)
    a.send("frames", header, tensors)
    [message] = list(b.receive())
    asyncio.run(relay.receive(message))
    assert relay.dropped == 1
    assert [decode_capture(*unpack_binary(f))[0].step for f in relay.frames] == [1, 2]


def test_connect_checks_its_arguments() -> None:
    model = small_encoder(EventDispatcher())
    with pytest.raises(ValueError, match="url"):
        Dashboard.connect(model, "ftp://host", run="x")
    with pytest.raises(TypeError, match="model"):
        Dashboard.connect("http://127.0.0.1:1", run="x")
    with pytest.raises(TypeError, match="url"):
        Dashboard.connect(model, run="x")
    with pytest.raises(ValueError, match="ranks"):
        Dashboard.connect(model, "http://127.0.0.1:1", run="x", ranks="some")


@pytest.mark.parametrize("call", [
    lambda model, url: Dashboard.connect(url, run="old/kw", model=model),
    lambda model, url: Dashboard.connect(url, "old/kw", model=model),
    lambda model, url: Dashboard.connect(url=url, run="old/kw", model=model),
])
def test_the_old_connect_form_still_publishes_and_warns(call) -> None:
    model = small_encoder(EventDispatcher())
    with pytest.warns(DeprecationWarning, match=r"Dashboard.connect\(model, url, run=...\)"):
        dash = call(model, _dead_url())
    try:
        assert dash.run.id == "old/kw" and dash.model is model
        dash.step(0, loss=1.0)  # nobody there: training goes on
        assert dash.run.step_index == 0
    finally:
        dash.close(timeout=1)
    assert httpx is not None


@pytest.fixture
def published() -> Iterator[tuple[Served, Any]]:
    """A server on loopback with one remote run, ``RUN``, published from this process."""
    registry = RunRegistry()
    with Served(registry) as served:
        dash = Dashboard.connect(small_encoder(EventDispatcher()), served.url, run=RUN)
        try:
            wait_for(lambda: RUN in registry.ids(), 10, "the remote run")
            yield served, dash
        finally:
            dash.close()


def test_a_run_id_with_slashes_works_on_every_run_route(published) -> None:
    served, dash = published
    dash.step(0, loss=1.5)
    dash.step(1, loss=1.25)
    assert served.http.get(f"/api/v1/runs/{RUN}").json()["id"] == RUN
    escaped = served.http.get("/api/v1/runs/alice%2Flr3e-4")
    assert escaped.status_code == 200 and escaped.json()["id"] == RUN
    wait_for(lambda: served.http.get(f"/api/v1/runs/{RUN}/scalars").json()["steps"] == [0, 1],
             10, "the scalars")
    refused = served.http.post(f"/api/v1/runs/{RUN}/pause")
    assert refused.status_code == 409 and "pause" in refused.json()["detail"]
    missing = served.http.get("/api/v1/runs/alice/other")
    assert missing.status_code == 404 and "alice/other" in missing.json()["detail"]


def test_a_killed_publisher_leaves_an_idle_run_that_can_be_deleted() -> None:
    registry = RunRegistry()
    with Served(registry) as served:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / "train_remote.py"), "--url", served.url,
             "--run-id", RUN, "--sleep", "0.02", "--seq-len", "8", "--device", "cpu"],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: RUN in registry.ids() and registry.get(RUN).step_index is not None,
                     60, "the publisher's first step")
            live = served.http.delete(f"/api/v1/runs/{RUN}")
            assert live.status_code == 409 and "live" in live.json()["detail"]
            proc.kill()  # no close(): the connection just drops
            proc.wait(10)
            wait_for(lambda: _runs(served)[RUN]["status"] == "idle", 10, "idle")
            assert _runs(served)[RUN]["error"] == "publisher disconnected"
            refused = served.http.post("/api/v1/captures", json={"run": RUN, "tokens": [[1, 2]]})
            assert refused.status_code == 409 and "idle" in refused.json()["detail"][0]["msg"]
            assert served.http.delete(f"/api/v1/runs/{RUN}").status_code == 204
            assert RUN not in _runs(served)
            assert served.http.delete(f"/api/v1/runs/{RUN}").status_code == 404
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def test_frames_larger_than_a_browser_message_reach_the_viewer() -> None:
    """A real model's matrices (here 4 heads x 400 x 400 float16, 1.2 MiB) travel
    from the publisher to the server whole: the publish socket's size limit is not
    the browsers' 64 KiB message limit."""
    registry = RunRegistry()
    model = small_encoder(EventDispatcher(), n_layers=1, n_heads=4)
    x = torch.randn(1, 400, 16)
    with Served(registry) as served:
        dash = Dashboard.connect(model, served.url, run=RUN)
        try:
            wait_for(lambda: RUN in registry.ids(), 10, "the remote run")

            async def body() -> None:
                ws = await viewer(served.ws_url, {})
                await ws.send(json.dumps({"type": "subscribe", "run": RUN, "max_side": 1024,
                                          "kinds": ["attention"]}))
                header, data = await recv_frame(ws, "attention", timeout=20)
                assert header["shape"] == [4, 400, 400]
                await ws.close()

            with _Loop(dash, model, x, sleep=0.05):
                run_async(body, timeout=40)
            assert dash.connections == 1  # the big frames never cost a reconnect
        finally:
            dash.close()


def test_steps_of_a_fast_loop_travel_in_batches_and_none_is_lost(published,
                                                                  monkeypatch) -> None:
    """Waking the sending thread at every step of a fast loop would slow the loop: steps
    leave at most every STEPS_PERIOD_S, and the last ones leave without a next step."""
    served, dash = published
    batches: list[int] = []
    apply_steps = RemoteRun.apply_steps
    monkeypatch.setattr(RemoteRun, "apply_steps",
                        lambda run, steps: (batches.append(len(steps)), apply_steps(run, steps)))
    started = time.monotonic()
    for step in range(200):
        dash.step(step, loss=1.0 / (step + 1))
        time.sleep(0.001)
    elapsed = time.monotonic() - started
    wait_for(lambda: served.http.get(f"/api/v1/runs/{RUN}/scalars").json()["steps"][-1:] == [199],
             10, "the last step")  # no step follows it: it leaves on the period alone
    assert served.http.get(f"/api/v1/runs/{RUN}/scalars").json()["steps"] == list(range(200))
    assert sum(batches) == 200
    assert len(batches) <= elapsed / STEPS_PERIOD_S + 2, batches


def test_a_nan_loss_reaches_the_server_and_publishing_goes_on(published) -> None:
    """A diverging run is when the dashboard matters most: NaN must not stop the publisher."""
    served, dash = published
    dash.step(0, loss=1.5)
    dash.step(1, loss=float("nan"), grad_norm=float("inf"))
    dash.step(2, loss=0.5)
    wait_for(lambda: served.http.get(f"/api/v1/runs/{RUN}/scalars").json()["steps"] == [0, 1, 2],
             10, "all three steps")
    scalars = served.http.get(f"/api/v1/runs/{RUN}/scalars").json()
    assert scalars["values"]["loss"] == [1.5, None, 0.5]
    assert dash.connected.is_set() and dash.connections == 1
