"""Remote publishing overhead: steps/s of a training loop publishing with Dashboard.connect.

Four loops on the demo model (DemoTraining, CPU), interleaved in rounds:
``none`` (no dashboard); ``remote``: publishing to a local ``attnscope serve``
subprocess on loopback (history on, the default: the trainer records its history
and sends it) with one websocket viewer, in a process of its own as a browser
would be, subscribed to every layer's attention, head statistics and scalars at
10 fps; ``remote-no-history``: the same with a server started with
``ATTNSCOPE_HISTORY_ENABLED=false``; ``unreachable``: publishing to a closed port;
``none-control``: a second loop without a dashboard, on its own model instance as
every loop is (two instances of one model differ in speed by a few percent here:
this line shows how much).
The servers and viewers run on the machine's last core and the trainer on the
others (they stand for other machines). Targets (issue #6): remote >= 0.95x,
unreachable >= 0.98x.

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
import time
from pathlib import Path

import httpx
import torch
import websockets

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attnscope import Dashboard  # noqa: E402
from attnscope.training.demo import DemoConfig, DemoTraining  # noqa: E402

TOKEN = "bench-remote-token-0123456789abcdef"


# The server and the viewer stand for other machines: on a machine of 2+ cores they
# run on the last core and the training process on the others, so what is measured
# is what publishing costs the training process, not the server's CPU use.
CORES = sorted(os.sched_getaffinity(0))
SERVER_CORES = {CORES[-1]} if len(CORES) > 1 else set(CORES)
TRAINER_CORES = set(CORES[:-1]) or set(CORES)


def _elsewhere() -> None:
    os.sched_setaffinity(0, SERVER_CORES)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(port: int, data_dir: str, history: bool = True) -> subprocess.Popen:
    env = {**os.environ, "ATTNSCOPE_TOKEN": TOKEN, "ATTNSCOPE_PORT": str(port),
           "ATTNSCOPE_DATA_DIR": data_dir, "ATTNSCOPE_HISTORY_ENABLED": str(history).lower()}
    proc = subprocess.Popen([sys.executable, "-m", "attnscope.cli", "serve"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=_elsewhere)
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not start")


def watch(port: int, run: str, seconds: float, tally: str) -> None:
    """A viewer (as a browser would be): subscribes to ``run`` and reads frames for
    ``seconds``, writing how many binary frames it got so far to the file ``tally``."""

    async def watch_for() -> None:
        url = f"ws://127.0.0.1:{port}/ws"
        async with websockets.connect(url, max_size=None, additional_headers={
                "Authorization": f"Bearer {TOKEN}"}) as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "subscribe", "run": run, "max_fps": 10,
                                      "kinds": ["attention", "head_stats", "scalars"]}))
            deadline = time.monotonic() + seconds
            frames = 0
            while time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    if isinstance(await asyncio.wait_for(ws.recv(), 0.5), bytes):
                        frames += 1
                        Path(tally).write_text(str(frames))

    with contextlib.suppress(websockets.ConnectionClosed, OSError):
        asyncio.run(watch_for())


def _viewer(port: int, run: str, tally: str) -> subprocess.Popen:
    """The viewer in a process of its own: browsers are not in the training process."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import remote; "
            f"remote.watch({port}, {run!r}, 3600, {tally!r})")
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, preexec_fn=_elsewhere)


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
    os.sched_setaffinity(0, TRAINER_CORES)
    torch.set_num_threads(len(TRAINER_CORES))
    import tempfile

    ports = {"remote": _free_port(), "remote-no-history": _free_port()}
    dead = _free_port()
    servers = [_serve(ports["remote"], tempfile.mkdtemp(prefix="attnscope-bench-")),
               _serve(ports["remote-no-history"], tempfile.mkdtemp(prefix="attnscope-bench-"),
                      history=False)]
    viewers: list[subprocess.Popen] = []
    try:
        kinds = ("none", "remote", "remote-no-history", "unreachable", "none-control")
        trainings = {k: DemoTraining(DemoConfig(device="cpu")) for k in kinds}
        dashes = {"none": None, "none-control": None, "unreachable": Dashboard.connect(
            trainings["unreachable"].model, f"http://127.0.0.1:{dead}", run="bench/dead",
            token=TOKEN)}
        tallies = {}
        for kind, port in ports.items():
            dash = dashes[kind] = Dashboard.connect(trainings[kind].model,
                                                    f"http://127.0.0.1:{port}",
                                                    run="bench/remote", token=TOKEN)
            dash.connected.wait(10)
            tallies[kind] = Path(tempfile.mkdtemp(prefix="attnscope-bench-")) / "frames"
            viewers.append(_viewer(port, "bench/remote", str(tallies[kind])))
            deadline = time.monotonic() + 20  # until the server forwarded the viewer's plan
            while not dash._publisher.plan.sources and time.monotonic() < deadline:
                time.sleep(0.05)
        for kind, training in trainings.items():  # warm-up
            _rate(training, dashes[kind], 0.5)
        rates: dict[str, list[float]] = {k: [] for k in trainings}
        for _ in range(args.rounds):
            for kind, training in trainings.items():
                rates[kind].append(_rate(training, dashes[kind], args.seconds))
        base = statistics.median(rates["none"])
        for kind in trainings:
            ratios = [r / b for r, b in zip(rates[kind], rates["none"], strict=True)]
            print(f"{kind:18s} {statistics.median(rates[kind]):8.1f} steps/s  "
                  f"{statistics.median(rates[kind]) / base:5.2f}x (median of per-round "
                  f"ratios {statistics.median(ratios):.2f})")
        for kind, tally in tallies.items():
            print(f"{kind}: {dashes[kind].dropped} frames dropped by the outgoing buffer, "
                  f"{dashes[kind].history_dropped} history records dropped; the viewer "
                  f"received {tally.read_text() if tally.exists() else 0} frames")
        for dash in dashes.values():
            if dash is not None:
                dash.close()
    finally:
        for proc in (*viewers, *servers):
            proc.kill()
            proc.wait(15)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
