"""Remote publishing overhead: steps/s of a training loop publishing with Dashboard.connect.

Three loops on the demo model (DemoTraining, CPU), interleaved in rounds:
``none`` (no dashboard), ``remote`` (publishing to a local ``attnscope serve``
subprocess on loopback with one websocket viewer subscribed to every layer's
attention, head statistics and scalars at 10 fps) and ``unreachable`` (publishing
to a closed port). Targets (issue #6): remote >= 0.95x, unreachable >= 0.98x.

    .venv/bin/python bench/remote.py [--rounds 5] [--seconds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch
import websockets

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server import Dashboard  # noqa: E402
from server.demo import DemoConfig, DemoTraining  # noqa: E402

TOKEN = "bench-remote-token-0123456789abcdef"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(port: int, data_dir: str) -> subprocess.Popen:
    env = {**os.environ, "ATTNSCOPE_TOKEN": TOKEN, "ATTNSCOPE_PORT": str(port),
           "ATTNSCOPE_DATA_DIR": data_dir}
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not start")


def _viewer(port: int, run: str, stop: threading.Event) -> threading.Thread:
    async def watch() -> None:
        url = f"ws://127.0.0.1:{port}/ws"
        async with websockets.connect(url, max_size=None, additional_headers={
                "Authorization": f"Bearer {TOKEN}"}) as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "subscribe", "run": run, "max_fps": 10,
                                      "kinds": ["attention", "head_stats", "scalars"]}))
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ws.recv(), 0.5)

    def watch_until_stopped() -> None:  # (not named run: that is the run id above)
        with contextlib.suppress(websockets.ConnectionClosed, OSError):
            asyncio.run(watch())

    thread = threading.Thread(target=watch_until_stopped, daemon=True)
    thread.start()
    return thread


def _rate(training: DemoTraining, dash, seconds: float) -> float:
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        r = training.step()
        if dash is not None:
            dash.step(r.step, loss=r.loss, accuracy=r.accuracy, tokens=r.tokens)
        steps += 1
    return steps / (time.perf_counter() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    import tempfile

    port = _free_port()
    dead = _free_port()
    server = _serve(port, tempfile.mkdtemp(prefix="attnscope-bench-"))
    stop = threading.Event()
    try:
        trainings = {k: DemoTraining(DemoConfig(device="cpu")) for k in
                     ("none", "remote", "unreachable")}
        dashes = {
            "none": None,
            "remote": Dashboard.connect(f"http://127.0.0.1:{port}", run="bench/remote",
                                        token=TOKEN, model=trainings["remote"].model),
            "unreachable": Dashboard.connect(f"http://127.0.0.1:{dead}", run="bench/dead",
                                             token=TOKEN, model=trainings["unreachable"].model),
        }
        dashes["remote"].connected.wait(10)
        _viewer(port, "bench/remote", stop)
        for kind, training in trainings.items():  # warm-up
            _rate(training, dashes[kind], 0.5)
        rates: dict[str, list[float]] = {k: [] for k in trainings}
        for _ in range(args.rounds):
            for kind, training in trainings.items():
                rates[kind].append(_rate(training, dashes[kind], args.seconds))
        base = statistics.median(rates["none"])
        for kind in trainings:
            ratios = [r / b for r, b in zip(rates[kind], rates["none"], strict=True)]
            print(f"{kind:12s} {statistics.median(rates[kind]):8.1f} steps/s  "
                  f"{statistics.median(rates[kind]) / base:5.2f}x (median of per-round "
                  f"ratios {statistics.median(ratios):.2f})")
        print(f"remote: {dashes['remote'].dropped} frames dropped by the outgoing buffer")
        for dash in dashes.values():
            if dash is not None:
                dash.close()
    finally:
        stop.set()
        server.terminate()
        server.wait(15)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
