"""``Dashboard.start(model)`` in a user's loop, and the ``attnscope`` command line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from stream_support import Wrapped, connect, recv_frame, run_async, small_encoder

from attnscope import Dashboard
from transformer_core.events import EventDispatcher

ROOT = Path(__file__).resolve().parents[2]


def test_dashboard_start_step_and_close(capsys):
    dispatcher = EventDispatcher()
    model = Wrapped(small_encoder(dispatcher), 8)
    x = torch.randn(2, 5, 3)
    with Dashboard.start(model, port=0, name="My Run") as dash:
        assert dash.url in capsys.readouterr().out
        health = httpx.get(dash.url + "/api/v1/health").json()
        assert health["status"] == "ok"
        [summary] = httpx.get(dash.url + "/api/v1/runs").json()
        assert summary["id"] == "my-run" and summary["name"] == "My Run"
        assert summary["controls"] == ["pause", "resume"]

        async def watch():
            ws = await connect(dash.url.replace("http", "ws") + "/ws")
            await ws.send(json.dumps({"type": "subscribe", "run": "my-run",
                                      "kinds": ["attention"], "layers": [1]}))
            for step in range(200):
                with torch.no_grad():
                    model(x)
                dash.step(step, loss=0.1, tokens=torch.tensor([[5, 6, 7, 8, 9]] * 2))
                try:
                    header, _ = await recv_frame(ws, "attention", timeout=0.02)
                    break
                except TimeoutError:
                    continue
            await ws.close()
            return header

        header = run_async(watch)
        assert header["labels"]["queries"] == ["5", "6", "7", "8", "9"]
        url = dash.url
    assert dash.run.status == "ended"
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/api/v1/health", timeout=2)
    # close() says where the run stays browsable (the data dir of its history)
    data_dir = os.environ["ATTNSCOPE_DATA_DIR"]
    assert f"attnscope serve --data-dir {data_dir}" in capsys.readouterr().out
    with pytest.warns(RuntimeWarning, match=r"step\(\) after close\(\): ignored") as seen:
        dash.step(1000)  # ignored, said once
        dash.step(1001)
    assert len(seen) == 1 and dash.run.step_index != 1000


def test_dashboard_start_serves_from_rank_zero_only(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")  # as torchrun sets it for the second process
    monkeypatch.setenv("WORLD_SIZE", "2")
    with Dashboard.start(small_encoder(EventDispatcher()), port=0) as dash:
        assert dash.url is None  # no server: rank 0 serves the dashboard
        dash.step(0, loss=1.0)
    assert capsys.readouterr().out == ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("args", [["--help"], ["demo", "--help"], ["serve", "--help"]])
def test_cli_help(args):
    out = subprocess.run([sys.executable, "-m", "attnscope.cli", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "usage: attnscope" in out.stdout


def test_cli_rejects_a_bad_setting():
    out = subprocess.run([sys.executable, "-m", "attnscope.cli", "serve", "--port", "70000"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "port" in out.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_demo_serves_and_stops_cleanly_on_signal(sig):
    port = free_port()
    env = {**os.environ, "ATTNSCOPE_DEVICE": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "attnscope.cli", "demo", "--port", str(port), "--no-browser",
         "--host", "127.0.0.1"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=1).is_success:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the demo server did not come up"
            time.sleep(0.2)
        deadline = time.monotonic() + 30
        while True:
            [run] = httpx.get(f"http://127.0.0.1:{port}/api/v1/runs", timeout=5).json()
            if run["step"] is not None:
                break
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert run["id"] == "demo" and run["status"] == "live"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert f"http://127.0.0.1:{port}" in out
    assert "Traceback" not in err
