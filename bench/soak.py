"""The soak of issue #25: a server under steady use and one misbehaving publisher, for
30 minutes. Opt-in, not part of the tests (it takes the machine for its duration).

Starts ``attnscope demo`` (its local run training at 4 steps/s, history on) in a
subprocess on a free loopback port, and for ``--seconds``:

- 5 well-behaved publishers (``Dashboard.connect``, processes of their own, a small
  demo model at ~5 steps/s each, recording history and sending it);
- 20 viewers (websockets subscribed to the demo and the remote runs at 2 fps);
- 1 misbehaving publisher (a process of its own) that, every 2 s, floods sessions past
  its run's quota, sends statistics and snapshots of the wrong shape, steps beyond
  int64, 200 KB metadata, frames past its announced max_len, opens a second
  connection for its live run, drops its socket without a word, announces a new run
  id now and then, and leaves 40 half-open HTTP connections from 127.0.0.3;
- a health probe every 0.5 s.

Every 10 s it samples the server's RSS, open file descriptors, threads and the data
dir's size. At the end it checks the bounds below (printed with the figures) and
that every run's history is complete: every step each good publisher and the demo
made has its statistics row, and the good runs' snapshots are every 10 steps
(thinned past 200). Publishers and the demo run with ATTNSCOPE_MAX_OVERHEAD=1, so
nothing is thinned by the cost budget and a missing row is a lost one.

Bounds, after a warm-up of a tenth of the run: RSS max - min < 64 MB and its slope
over the second half < 1 MB/min; threads max - min <= 4; open descriptors at most
the warm-up median + 128 (the per-client connection cap: the half-open connections
in flight) + 16, their floor (fewest open: a sample may or may not fall while the
half-open connections are held) over the second half at most the first half's + 8;
data dir below the history quotas (history_max_bytes + runs x history_max_run_bytes); health
p99 per minute printed (no bound: this machine is shared).

    .venv/bin/python bench/soak.py [--seconds 1800]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import safetensors.numpy
import websockets

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from abuse import Health, free_port  # noqa: E402  (bench/ is this script's folder)

MiB = 1 << 20
GOOD = 5
VIEWERS = 20
SAMPLE_S = 10.0
STEP_S = 0.2  # good publishers: ~5 steps/s
ENV = {"ATTNSCOPE_DEVICE": "cpu", "ATTNSCOPE_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1",
       "ATTNSCOPE_MAX_OVERHEAD": "1"}


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "Threads"):
                out[key] = int(value.split()[0])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (the server deletes some as it goes)."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(folder, name)).st_size
            except FileNotFoundError:
                continue
    return total


# -- a well-behaved publisher (a process of its own) ----------------------------------------

def good_publisher(url: str, run: str, seconds: float, out: str) -> None:
    from attnscope import Dashboard
    from attnscope.training.demo import DemoConfig, DemoTraining

    config = DemoConfig(seq_len=8, n_symbols=10, n_layers=2, n_heads=2, d_head=4,
                        feed_forward=16, batch_size=4, device="cpu")
    training = DemoTraining(config)
    dash = Dashboard.connect(training.model, url, run=run, symbols=training.task.symbols)
    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        result = training.step()
        dash.step(result.step, loss=result.loss, tokens=result.tokens)
        last = result.step
        time.sleep(max(0.0, STEP_S - (time.monotonic() - t0)))
    dash.close(timeout=30)
    Path(out).write_text(json.dumps({"run": run, "last_step": last,
                                     "history_dropped": dash.history_dropped,
                                     "connections": dash.connections,
                                     "dropped_frames": dash.dropped}))


# -- the misbehaving publisher ---------------------------------------------------------------

def _binary(header: dict, payload: bytes) -> bytes:
    raw = json.dumps(header, allow_nan=True).encode()
    raw += b" " * ((-4 - len(raw)) % 8)
    return len(raw).to_bytes(4, "little") + raw + payload


def misbehave(url: str, seconds: float, out: str) -> None:
    from attnscope.core.stats import HEAD_STATISTICS

    ws_url = url.replace("http", "ws") + "/ws/publish"
    port = int(url.rsplit(":", 1)[1])
    names = list(HEAD_STATISTICS)
    counts: dict[str, int] = {}

    def count(what: str) -> None:
        counts[what] = counts.get(what, 0) + 1

    def announce(run: str, secret: str | None = None) -> str:
        details = [{"name": f"l{i}", "heads": 2, "role": "self"} for i in range(2)]
        return json.dumps({"type": "announce", "wire": 1, "run": run, "name": run,
                           "host": "mallory:1", "records_history": True, "secret": secret,
                           "model": {"layer_details": details, "max_len": 8}})

    def session(name: str, **meta: Any) -> str:
        return json.dumps({"type": "history_session", "session": name, "name": "bad",
                           "meta": {"stat_names": names, **meta}})

    def stats(name: str, step: Any, shape: list[int]) -> bytes:
        return _binary({"kind": "history_stats", "session": name,
                        "rows": [[step, 1.0, {"loss": 0.5}, shape]]},
                       np.zeros(int(np.prod(shape)), "<f4").tobytes())

    def snapshot(name: str, step: Any, tensors: dict[str, np.ndarray]) -> bytes:
        return _binary({"kind": "history_snapshot", "session": name, "step": step,
                        "time": 1.0, "labels": None}, safetensors.numpy.save(tensors))

    good = {"attention.0": np.full((1, 2, 8, 8), 0.1, np.float16)}
    secrets: dict[str, str] = {}

    async def cycle(i: int) -> None:
        run = f"soak/bad/{i // 25}"  # a new run id every 50 s
        pub = await websockets.connect(ws_url, max_size=None)
        await pub.send(announce(run, secrets.get(run)))
        welcome = json.loads(await pub.recv())
        if welcome.get("type") != "welcome":
            count(f"refused: {welcome.get('message', '')[:40]}")
            await pub.close()
            return
        secrets[run] = welcome["secret"]
        step = 10 * i
        messages: list[str | bytes] = [session(f"c{i}-{k}") for k in range(15)]  # > quota
        messages += [session("main"), stats("main", step, [2, len(names), 2]),
                     snapshot("main", step, good),  # its own history grows
                     stats("main", step + 1, [3]), stats("main", step + 2, [7, 5, 99]),
                     snapshot("main", 2**70, good),
                     snapshot("main", step + 3, {"attention.0": np.zeros((1, 2, 8, 8))}),
                     snapshot("main", step + 4, {"../../x": good["attention.0"]}),
                     session("big", blob="x" * 200_000),
                     _binary({"kind": "attention", "layer": 0, "sample": 0, "heads": [0, 1],
                              "role": "self", "time": 1.0, "step": step, "dtype": "float16",
                              "shape": [2, 64, 64], "labels": None, "valid": None},
                             np.zeros((2, 64, 64), "<f2").tobytes()),
                     json.dumps({"type": "steps", "steps": [[step, 1.0, {"loss": 1e308}, 4, 8]]})]
        for message in messages:
            await pub.send(message)
            count("sent")
        if i % 10 == 5:  # a second connection for the live run, with its secret
            second = await websockets.connect(ws_url)
            await second.send(announce(run, secrets[run]))
            answer = json.loads(await second.recv())
            count(f"second connection: {answer['type']} retry={answer.get('retry')}")
            await second.close()
        try:
            while True:
                message = json.loads(await asyncio.wait_for(pub.recv(), 0.5))
                if message.get("type") == "error":
                    count(f"error {message.get('field')}")
        except (TimeoutError, websockets.ConnectionClosed):
            pass
        if i % 3 == 0:
            await pub.send(json.dumps({"type": "close"}))
            pub.transport.close()  # and gone at once
        else:
            pub.transport.abort()  # no close at all: the run goes idle

    def half_open() -> None:
        held = []
        for _ in range(40):
            try:
                sock = socket.socket()
                sock.bind(("127.0.0.3", 0))
                sock.connect(("127.0.0.1", port))
                held.append(sock)
            except OSError:
                count("half-open connect failed")
        time.sleep(1.0)
        for sock in held:
            sock.close()
        count("half-open x40")

    async def main() -> None:
        deadline = time.monotonic() + seconds
        i = 0
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            try:
                await cycle(i)
            except (OSError, websockets.WebSocketException, TimeoutError) as exc:
                count(f"client error {type(exc).__name__}")
            await asyncio.to_thread(half_open)
            i += 1
            await asyncio.sleep(max(0.0, 2.0 - (time.monotonic() - t0)))
        counts["cycles"] = i

    asyncio.run(main())
    Path(out).write_text(json.dumps(counts))


# -- viewers and the health probe (the soak's own process) -----------------------------------

class Viewers(threading.Thread):
    def __init__(self, ws: str, runs: list[str]) -> None:
        super().__init__(daemon=True)
        self.ws, self.runs = ws, runs
        self.frames = [0] * VIEWERS
        self.closed: list[Any] = []
        self.stop = threading.Event()

    def run(self) -> None:
        asyncio.run(self._all())

    async def _all(self) -> None:
        await asyncio.gather(*(self._one(i) for i in range(VIEWERS)))

    async def _one(self, i: int) -> None:
        run = self.runs[i % len(self.runs)]
        while not self.stop.is_set():
            try:
                async with websockets.connect(self.ws, max_size=None) as ws:
                    await ws.send(json.dumps({"type": "subscribe", "run": run, "max_fps": 2,
                                              "kinds": ["attention", "head_stats",
                                                        "scalars"]}))
                    while not self.stop.is_set():
                        try:
                            message = await asyncio.wait_for(ws.recv(), 1.0)
                        except TimeoutError:
                            continue
                        self.frames[i] += isinstance(message, bytes)
                        if isinstance(message, str) and '"type":"error"' in message:
                            raise OSError(f"refused: {message[:60]}")  # subscribe again
            except (OSError, websockets.WebSocketException) as exc:
                self.closed.append(repr(exc)[:80])
                await asyncio.sleep(1.0)


def complete(http: httpx.Client, run: str, last: int | None, every: int = 10) -> str:
    """Whether ``run``'s history has a row for every step from its first up to ``last``
    and a snapshot at its first step and every ``every`` steps (thinned past 200 by
    design: then the first, the newest and the count are checked)."""
    index = http.get(f"/api/v1/runs/{run}/history").json()
    steps = index["stats"]["steps"]
    gaps = (steps[-1] - steps[0] + 1 - len(steps)) if steps else None
    snaps = [s["step"] for s in index["snapshots"]]
    ok = bool(steps) and gaps == 0 and (last is None or steps[-1] == last)
    expected = sorted({steps[0], *range(0, steps[-1] + 1, every)} - set(range(steps[0]))) \
        if steps else []
    snap_ok = snaps == expected if len(expected) <= 200 else \
        (len(snaps) == 200 and snaps[0] == expected[0] and snaps[-1] == expected[-1])
    return (f"{run}: rows {steps[0] if steps else '-'}..{steps[-1] if steps else '-'} "
            f"({len(steps)}, {gaps} missing, last step {last}), {len(snaps)} snapshots "
            f"-> {'complete' if ok and snap_ok else 'INCOMPLETE'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1800.0)
    parser.add_argument("--publisher", nargs=4, metavar=("URL", "RUN", "SECONDS", "OUT"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--misbehave", nargs=3, metavar=("URL", "SECONDS", "OUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.publisher:
        url, run, seconds, out = args.publisher
        good_publisher(url, run, float(seconds), out)
        return
    if args.misbehave:
        url, seconds, out = args.misbehave
        misbehave(url, float(seconds), out)
        return
    run_soak(args.seconds)


def run_soak(seconds: float) -> None:
    with tempfile.TemporaryDirectory() as folder, \
            open(Path(folder) / "server.log", "w") as server_log:
        children: list[subprocess.Popen] = []
        try:
            soak(seconds, Path(folder), server_log, children)
        finally:  # whatever happened, nothing of the soak keeps running
            for child in children:
                if child.poll() is None:
                    child.terminate()
                    child.wait(30)
        log = (Path(folder) / "server.log").read_text()
        print(f"server log: {len(log.splitlines())} lines, {log.count('Traceback')} tracebacks, "
              f"{log.count('ERROR')} ERROR lines, {log.count('1011')} mentions of 1011")
        for line in log.splitlines():
            if "ERROR" in line or "Error" in line:
                print("  ", line[:300])


def soak(seconds: float, folder: Path, server_log: Any,
         children: list[subprocess.Popen]) -> None:
    import attnscope.cli

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data = folder / "data"
    env = {**os.environ, **ENV, "ATTNSCOPE_DATA_DIR": str(data)}
    server = subprocess.Popen([sys.executable, "-m", attnscope.cli.__name__, "demo",
                               "--port", str(port), "--no-browser", "--max-rate", "4"],
                              env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=server_log)
    children.append(server)
    http = httpx.Client(base_url=url, timeout=30)
    deadline = time.monotonic() + 60
    while True:
        try:
            runs = http.get("/api/v1/runs").json()
            if runs and (runs[0]["step"] or 0) > 5:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            raise SystemExit("the demo did not start")
        time.sleep(0.3)
    good = [f"soak/good/{i}" for i in range(GOOD)]
    procs = [subprocess.Popen([sys.executable, __file__, "--publisher", url, run,
                               str(seconds), str(folder / f"good{i}.json")],
                              env={**os.environ, **ENV}, cwd=ROOT)
             for i, run in enumerate(good)]
    children.extend(procs)
    deadline = time.monotonic() + 120  # the runs exist before the viewers subscribe
    while not set(good) <= {r["id"] for r in http.get("/api/v1/runs").json()}:
        if time.monotonic() > deadline:
            raise SystemExit("the good publishers did not connect")
        time.sleep(0.5)
    bad = subprocess.Popen([sys.executable, __file__, "--misbehave", url, str(seconds - 10),
                            str(folder / "bad.json")], env={**os.environ, **ENV}, cwd=ROOT)
    children.append(bad)
    viewers = Viewers(url.replace("http", "ws") + "/ws", ["demo", *good])
    health = Health(url, period=0.5)
    viewers.start()
    health.start()
    samples: list[dict[str, Any]] = []
    loads: list[float] = []
    t_start = time.monotonic()
    print(f"soak: {seconds:.0f} s, server pid {server.pid}, {os.cpu_count()} CPUs, "
          f"load average at start {os.getloadavg()[0]:.1f}", flush=True)
    print("| minute | RSS MB | fds | threads | data dir MB | health p50 / p99 ms | "
          "viewer frames | load |", flush=True)
    print("|---|---|---|---|---|---|---|---|", flush=True)
    frames_seen = 0
    while time.monotonic() - t_start < seconds:
        time.sleep(SAMPLE_S)
        now = time.monotonic()
        sample = {"t": now - t_start, **proc_status(server.pid), "disk": folder_bytes(data)}
        samples.append(sample)
        loads.append(os.getloadavg()[0])
        if len(samples) % 6 == 0:
            recent = sorted(lat for t, lat in zip(health.times, health.samples, strict=False)
                            if t > now - 60) or [0.0]
            frames = sum(viewers.frames)
            print(f"| {sample['t'] / 60:.0f} | {sample['VmRSS'] / 1024:.0f} | "
                  f"{sample['fds']} | {sample['Threads']} | {sample['disk'] / MiB:.1f} | "
                  f"{statistics.median(recent) * 1e3:.1f} / "
                  f"{recent[int(0.99 * (len(recent) - 1))] * 1e3:.1f} | "
                  f"{frames - frames_seen} | {loads[-1]:.1f} |", flush=True)
            frames_seen = frames
    starving = [i for i, n in enumerate(viewers.frames) if n == 0]
    for proc in procs:
        proc.wait(120)
    bad.wait(120)
    viewers.stop.set()
    health.stop.set()
    time.sleep(2.0)  # the writer stores the last records
    report(http, samples, loads, health, viewers, starving, str(folder), good)


def report(http: httpx.Client, samples: list[dict], loads: list[float], health: Health,
           viewers: Viewers, starving: list[int], folder: str, good: list[str]) -> None:
    from attnscope.settings import Settings

    settings = Settings()
    warm = samples[len(samples) // 10:]
    half = warm[len(warm) // 2:]
    rss = [s["VmRSS"] / 1024 for s in warm]
    slope = np.polyfit([s["t"] / 60 for s in half], [s["VmRSS"] / 1024 for s in half], 1)[0] \
        if len(half) > 1 else 0.0
    fds = [s["fds"] for s in warm]
    fd_base = statistics.median(fds[: max(1, len(fds) // 10)])
    threads = [s["Threads"] for s in warm]
    disk = samples[-1]["disk"]
    runs = len({s["run"] for s in http.get("/api/v1/history").json()})
    disk_bound = settings.history_max_bytes + runs * settings.history_max_run_bytes
    lat = sorted(health.samples)
    checks = {
        f"RSS max - min {max(rss) - min(rss):.1f} MB < 64 MB": max(rss) - min(rss) < 64,
        f"RSS slope over the second half {slope:.2f} MB/min < 1 MB/min": slope < 1.0,
        f"threads {min(threads)}..{max(threads)} (max - min <= 4)":
            max(threads) - min(threads) <= 4,
        f"fds {min(fds)}..{max(fds)}, at most {fd_base:.0f} + 144":
            max(fds) <= fd_base + 144,
        f"fds floor (fewest open) of the second half {min(fds[len(fds) // 2:])} <= the first "
        f"half's {min(fds[: len(fds) // 2])} + 8":
            min(fds[len(fds) // 2:]) <= min(fds[: len(fds) // 2]) + 8,
        f"data dir {samples[0]['disk'] / MiB:.1f} -> {disk / MiB:.1f} MB < quotas "
        f"{disk_bound / MiB:.0f} MB ({runs} runs recorded)": disk < disk_bound,
        f"every viewer received frames ({VIEWERS - len(starving)} of {VIEWERS})": not starving,
        f"health: {len(lat)} probes, {health.errors} errors, p50 "
        f"{statistics.median(lat) * 1e3:.1f} ms, p99 {lat[int(0.99 * (len(lat) - 1))] * 1e3:.1f}"
        f" ms, max {lat[-1] * 1e3:.0f} ms": health.errors == 0,
    }
    print(f"\nload average over the run: min {min(loads):.1f}, mean "
          f"{statistics.mean(loads):.1f}, max {max(loads):.1f} ({os.cpu_count()} CPUs)")
    for text, ok in checks.items():
        print(f"- {'ok  ' if ok else 'FAIL'} {text}")
    print("\nhistory:")
    for i, run in enumerate(good):
        result = json.loads((Path(folder) / f"good{i}.json").read_text())
        print(f"- {complete(http, run, result['last_step'])} (publisher: "
              f"{result['connections']} connection(s), {result['history_dropped']} history "
              f"records dropped)")
    print(f"- {complete(http, 'demo', None)}")
    bad = json.loads((Path(folder) / "bad.json").read_text())
    kept = [s for s in http.get("/api/v1/history").json() if s["run"].startswith("soak/bad")]
    print(f"\nmisbehaving publisher: {bad.get('cycles')} cycles; answers "
          f"{ {k: v for k, v in sorted(bad.items()) if k != 'cycles'} }; its sessions kept "
          f"{len(kept)} over {len({s['run'] for s in kept})} run ids, "
          f"{sum(s['bytes'] for s in kept) / 1024:.1f} KiB of snapshots")
    if viewers.closed:
        print(f"viewer reconnections: {len(viewers.closed)} ({viewers.closed[:3]})")


if __name__ == "__main__":
    main()
