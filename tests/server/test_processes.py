"""The two processes of ``Dashboard.start``: the training process keeps only the capture
path (no thread of ours, no torch op on a step nobody watches), and the server process
lives exactly as long as it should (killed, restarted, replaced, interrupted)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from stream_support import connect, recv_frame, run_async, small_encoder
from torch.utils._python_dispatch import TorchDispatchMode

from attnscope import Dashboard
from attnscope.settings import Settings
from transformer_core.events import EventDispatcher

ROOT = Path(__file__).resolve().parents[2]

TRAINER = textwrap.dedent('''
    import json, sys, threading, time
    import torch
    from transformer_core.builders import TransformerEncoderBuilder
    from attnscope import Dashboard
    from attnscope.settings import Settings

    def say(**what):
        print(json.dumps(what), flush=True)

    torch.manual_seed(0)
    model = TransformerEncoderBuilder.from_kwargs(n_layers=2, n_heads=2, query_dimensions=4,
        value_dimensions=4, feed_forward_dimensions=16).get()
    port, data_dir, steps = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    dash = Dashboard.start(model, port=port, quiet=True, name="run",
                           settings=Settings(data_dir=data_dir))
    say(url=dash.url, child=dash._process.proc.pid,
        threads=[t.name for t in threading.enumerate()])
    x = torch.randn(1, 6, 8)
    watched = False
    for step in range(steps):
        model(x).sum().backward()
        dash.step(step, loss=1.0)
        if not watched and dash._link.publisher.plan.sources and step > 0:
            watched = True
            for more in range(20):  # frames flowing to the viewer meanwhile
                model(x).sum().backward()
                dash.step(step + 1 + more, loss=1.0)
                time.sleep(0.02)
            say(watched=True, threads=[t.name for t in threading.enumerate()])
        time.sleep(0.02)
    dash.close()
    say(closed=True, threads=[t.name for t in threading.enumerate()])
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie of a process we did not start is not ours to reap: look at its state
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return not _alive(pid)


@contextlib.contextmanager
def _trainer(tmp_path: Path, port: int, steps: int) -> Iterator[subprocess.Popen]:
    """The training script above in a process of its own (killed and reaped at the end)."""
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    proc = subprocess.Popen([sys.executable, str(script), str(port), str(tmp_path / "data"),
                             str(steps)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def _said(proc: subprocess.Popen, key: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        said = json.loads(line)
        if key in said:
            return said
    raise AssertionError(f"the trainer never said {key!r} (exit code {proc.poll()})")


def test_no_thread_of_ours_in_the_training_process(tmp_path: Path) -> None:
    """After start, while a viewer watches every layer, and after close: the training
    process runs the user's thread only."""
    with _trainer(tmp_path, 0, 400) as proc:
        started = _said(proc, "url")
        assert started["threads"] == ["MainThread"]

        async def watch() -> None:
            ws = await connect(started["url"].replace("http", "ws") + "/ws")
            await ws.send(json.dumps({"type": "subscribe", "run": "run",
                                      "kinds": ["attention", "head_stats", "scalars"]}))
            await recv_frame(ws, "attention", timeout=30)  # frames do flow
            watched = await asyncio.to_thread(_said, proc, "watched")
            assert watched["threads"] == ["MainThread"]
            await ws.close()

        run_async(watch, timeout=90)
        closed = _said(proc, "closed")
        assert closed["threads"] == ["MainThread"]
        assert proc.wait(30) == 0
        assert _wait_gone(started["child"], 10)


class _Ops(TorchDispatchMode):
    """Counts the torch ops dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _ops_per_step(model, x, step) -> int:
    with _Ops() as ops:
        model(x).sum().backward()
        step()
    return ops.count


def test_no_torch_op_of_ours_when_nobody_watches_and_a_bounded_number_when_watched(
        tmp_path: Path) -> None:
    model = small_encoder(EventDispatcher()).train()
    x = torch.randn(1, 6, 8)
    plain = _ops_per_step(model, x, lambda: None)
    settings = Settings(data_dir=tmp_path, history_enabled=False)
    with Dashboard.start(model, port=0, quiet=True, name="run", settings=settings) as dash:
        steps = iter(range(10_000))
        idle = [_ops_per_step(model, x, lambda: dash.step(next(steps), loss=1.0))
                for _ in range(5)]
        assert idle == [plain] * 5  # nobody watches, no record due: not one op of ours

        async def watched() -> list[int]:
            ws = await connect(dash.url.replace("http", "ws") + "/ws")
            await ws.send(json.dumps({"type": "subscribe", "run": "run", "layers": [1],
                                      "kinds": ["attention", "head_stats"], "max_fps": 60}))
            counts = []
            for _ in range(200):
                counts.append(_ops_per_step(model, x, lambda: dash.step(next(steps), loss=1.0)))
                try:
                    await recv_frame(ws, "attention", timeout=0.05)
                    break
                except TimeoutError:
                    continue
            await ws.close()
            return counts

        counts = run_async(watched, timeout=60)
    extra = max(counts) - plain
    # One watched layer, captured on the CPU: a copy of the sample's queries and keys
    # (their slices and clones); the attention itself is computed in the server process.
    assert 0 < extra <= 8, (plain, counts)


def test_a_killed_server_process_comes_back_and_training_goes_on(tmp_path: Path) -> None:
    model = small_encoder(EventDispatcher())
    x = torch.randn(1, 6, 8)
    with Dashboard.start(model, port=0, quiet=True, name="run",
                         settings=Settings(data_dir=tmp_path)) as dash:
        first = dash._process.proc.pid
        for step in range(3):
            model(x)
            dash.step(step, loss=1.0)
        os.kill(first, signal.SIGKILL)
        costs = []
        deadline = time.monotonic() + 30
        step = 3
        while time.monotonic() < deadline:
            model(x)
            t0 = time.perf_counter()
            dash.step(step, loss=1.0)  # never raises, never waits for the server
            costs.append(time.perf_counter() - t0)
            step += 1
            if dash._process.proc.pid != first and dash._process.alive:
                break
            time.sleep(0.05)
        assert dash._process.proc.pid != first, "the server process was not started again"
        assert sorted(costs)[len(costs) // 2] < 0.01  # a typical step stays cheap
        health = httpx.get(dash.url + "/api/v1/health", timeout=10)  # the same URL
        assert health.status_code == 200
        for more in range(5):
            model(x)
            dash.step(step + more, loss=0.5)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            run = httpx.get(dash.url + "/api/v1/runs/run", timeout=5).json()
            if run["step"] == step + 4:
                break
            time.sleep(0.1)
        assert run["step"] == step + 4 and run["status"] == "live"
    assert _wait_gone(dash._process.proc.pid, 10)


def test_a_killed_training_process_takes_its_server_process_along(tmp_path: Path) -> None:
    port = _free_port()
    with _trainer(tmp_path, port, 100_000) as proc:
        child = _said(proc, "url")["child"]
        proc.kill()  # SIGKILL: no cleanup of any kind in the training process
        proc.wait(10)
        assert _wait_gone(child, 10), "the server process outlived the training process"
        with socket.socket() as s:  # and the port is free again
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))


def test_ctrl_c_in_the_training_loop_stops_both(tmp_path: Path) -> None:
    with _trainer(tmp_path, 0, 100_000) as proc:
        child = _said(proc, "url")["child"]
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends the loop
        assert proc.wait(30) != 0  # KeyboardInterrupt ends the script
        assert _wait_gone(child, 10)


def test_starting_twice_on_one_port_replaces_the_first(tmp_path: Path, caplog) -> None:
    """A notebook cell run twice: the second dashboard takes over the port, the first's
    server process is gone, nothing is left bound."""
    port = _free_port()
    model = small_encoder(EventDispatcher())
    settings = Settings(data_dir=tmp_path)
    first = Dashboard.start(model, port=port, quiet=True, settings=settings)
    first_pid = first._process.proc.pid
    second = Dashboard.start(model, port=port, quiet=True, settings=settings)
    try:
        assert first._closed and _wait_gone(first_pid, 10)
        assert "closing the dashboard already on" in caplog.text
        assert httpx.get(second.url + "/api/v1/health", timeout=10).status_code == 200
        model(torch.randn(1, 6, 8))
        second.step(0, loss=1.0)
    finally:
        second.close()


def test_a_port_in_use_is_an_error_naming_it(tmp_path: Path) -> None:
    from attnscope.core.sockets import PortInUse

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(PortInUse, match=f"127.0.0.1:{port}.*in use"):
            Dashboard.start(small_encoder(EventDispatcher()), port=port, quiet=True,
                            settings=Settings(data_dir=tmp_path))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_watching_copies_on_a_side_stream_and_never_waits(tmp_path: Path) -> None:
    """A watched and recorded step on a GPU: the dashboard's copies go to pinned buffers on
    a side stream (allocated once, events reused), and no synchronisation happens in the
    training thread (sync-debug mode raises on one)."""
    model = small_encoder(EventDispatcher()).cuda().train()
    x = torch.randn(2, 6, 8, device="cuda")
    settings = Settings(data_dir=tmp_path)
    with Dashboard.start(model, port=0, quiet=True, name="run", settings=settings) as dash:
        steps = iter(range(10_000))

        def step() -> None:
            model(x).sum().backward()
            torch.cuda.set_sync_debug_mode("error")
            try:
                dash.step(next(steps), loss=1.0)  # a float: the loop's own .item() happened
            finally:
                torch.cuda.set_sync_debug_mode(0)

        async def watched() -> dict:
            ws = await connect(dash.url.replace("http", "ws") + "/ws")
            await ws.send(json.dumps({"type": "subscribe", "run": "run",
                                      "kinds": ["attention", "head_stats"], "max_fps": 60}))
            for _ in range(300):
                step()
                try:
                    header, _ = await recv_frame(ws, "attention", timeout=0.02)
                    break
                except TimeoutError:
                    continue
            staging = dash._link.staging
            before = (staging.allocated, staging.events_made)
            for _ in range(30):  # steady state: nothing new allocated or created
                step()
            await ws.close()
            return {"header": header, "before": before,
                    "after": (staging.allocated, staging.events_made)}

        seen = run_async(watched, timeout=120)
    assert seen["header"]["kind"] == "attention"
    assert seen["after"] == seen["before"], "pinned buffers or events made on watched steps"
    assert dash._link.staging._side, "no side stream was used"


def test_our_processes_leave_the_training_the_cores() -> None:
    """The server and relay processes compute with a quarter of the cores (1 to 4): torch's
    default, a spinning thread per core, would take the cores a training process uses."""
    from attnscope.backend.child import torch_threads

    assert [torch_threads(n) for n in (1, 2, 4, 8, 16, 128)] == [1, 1, 1, 2, 4, 4]
