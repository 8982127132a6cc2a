"""The attacks of issue #16 against a live ``attnscope demo``: each refused or bounded?

Starts ``attnscope demo`` (training, CPU) in a subprocess on a free loopback port,
then runs each attack while a thread polls ``/api/v1/health`` every 20 ms. For
each attack it prints what the server answered, the server's peak RSS growth
during the attack (VmHWM, reset before each attack through /proc/PID/clear_refs)
and the health latency (p50 / p99 / max). Targets: every attack refused or
bounded, RSS growth < 50 MB, health p99 < 100 ms.

    .venv/bin/python bench/abuse.py [--capture-seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import websockets

import attnscope.cli
from attnscope.protocol import pack as pack_binary

ROOT = Path(__file__).resolve().parents[1]

MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class Health(threading.Thread):
    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.samples, self.errors = url, [], 0
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=5) as c:
            while not self.stop.is_set():
                t0 = time.perf_counter()
                try:
                    c.get(self.url + "/api/v1/health").raise_for_status()
                except httpx.HTTPError:
                    self.errors += 1
                self.samples.append(time.perf_counter() - t0)
                time.sleep(0.02)


def measure(pid: int, url: str, attack: Callable[[], str]) -> dict[str, Any]:
    base = status_kb(pid, "VmRSS")
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        peak_key = "VmHWM"
    except OSError:
        peak_key = "VmRSS"
    health = Health(url)
    health.start()
    t0 = time.perf_counter()
    try:
        answer = attack()
    except Exception as exc:  # noqa: BLE001 (a bench reports, it does not stop)
        answer = f"client error: {exc!r}"
    seconds = time.perf_counter() - t0
    time.sleep(max(0.3, 1.0 - seconds))  # at least 1 s of health samples per attack
    health.stop.set()
    health.join()
    lat = sorted(health.samples) or [float("nan")]
    return {"answer": answer, "rss_mb": (status_kb(pid, peak_key) - base) / 1024,
            "p50": lat[len(lat) // 2] * 1e3, "p99": lat[int(0.99 * (len(lat) - 1))] * 1e3,
            "max": lat[-1] * 1e3, "seconds": seconds, "health_errors": health.errors}


# -- the attacks -----------------------------------------------------------------------

def attacks(url: str, capture_seconds: float) -> dict[str, Callable[[], str]]:
    ws = url.replace("http", "ws")
    http = httpx.Client(base_url=url, timeout=60)

    def dup_heads(route: str) -> Callable[[], str]:
        def run() -> str:
            r = http.get(f"/api/v1/runs/demo/history/{route}heads=" + ",".join(["0"] * 10_000))
            return f"{r.status_code} {len(r.content)} B"
        return run

    def capture_dups() -> str:
        r = http.post("/api/v1/captures", json={
            "run": "demo", "tokens": [[1] * 24] * 64, "heads": [0] * 1024,
            "kinds": ["attention", "qkv", "qk_logits", "intermediate"]})
        return f"{r.status_code} {r.text[:60]}"

    def capture_flood() -> str:
        statuses: dict[int, int] = {}
        deadline = time.monotonic() + capture_seconds
        body = {"run": "demo", "tokens": [[1] * 24] * 64,
                "kinds": ["attention", "qkv", "qk_logits", "intermediate"]}
        while time.monotonic() < deadline:
            s = http.post("/api/v1/captures", json=body).status_code
            statuses[s] = statuses.get(s, 0) + 1
        listed = http.get("/api/v1/captures?limit=500").json()
        stored = sum(c["file_bytes"] for c in listed["items"])
        return f"{statuses}, {stored / MiB:.0f} MiB stored"

    async def _publisher(announce: dict) -> Any:
        pub = await websockets.connect(ws + "/ws/publish", max_size=None)
        await pub.send(json.dumps(announce))
        return pub, json.loads(await pub.recv())

    def announce(run: str, layers: int = 2, heads: int = 2, **extra: Any) -> dict:
        return {"type": "announce", "wire": 1, "run": run, "name": run, "host": "bench:1",
                "model": {"layer_details": [{"name": f"l{i}", "heads": heads}
                                            for i in range(layers)]}, **extra}

    def bad_frame() -> str:
        async def body() -> str:
            pub, _ = await _publisher(announce("abuse/frame"))
            viewer = await websockets.connect(ws + "/ws", max_size=None)
            await viewer.recv()
            await viewer.send(json.dumps({"type": "subscribe", "run": "abuse/frame",
                                          "kinds": ["attention"]}))
            header = {"kind": "attention", "layer": 0, "sample": 0, "heads": [0, 1],
                      "role": "self", "time": 1.0, "step": 1, "dtype": "float16",
                      "shape": [8, 8], "labels": None, "valid": None}
            await pub.send(pack_binary(header, np.zeros((8, 8), "<f2").tobytes()))
            reply = None
            while reply is None or reply.get("type") == "plan":
                reply = json.loads(await asyncio.wait_for(pub.recv(), 5))
            await pub.close()
            try:
                while True:
                    await asyncio.wait_for(viewer.recv(), 1.0)
            except TimeoutError:
                viewer_state = "viewer open"
            except websockets.ConnectionClosed as exc:
                viewer_state = f"viewer closed {exc.rcvd.code if exc.rcvd else '?'}"
            await viewer.close()
            return f"publisher got {reply.get('type')} ({reply.get('field')}); {viewer_state}"
        return lambda: asyncio.run(body())

    def big_announce(**kw: Any) -> Callable[[], str]:
        async def body() -> str:
            pub, reply = await _publisher(announce("abuse/big", **kw))
            await pub.close()
            size = len(http.get("/api/v1/runs").content)
            return f"{reply['type']}: {reply.get('message', '')[:50]}; runs {size} B"
        return lambda: asyncio.run(body())

    def many_publishers() -> str:
        async def body() -> str:
            socks, codes = [], {}
            for i in range(300):
                try:
                    pub = await websockets.connect(ws + "/ws/publish")
                    await pub.send(json.dumps(announce(f"abuse/many/{i}")))
                    reply = json.loads(await asyncio.wait_for(pub.recv(), 5))
                    codes[reply["type"]] = codes.get(reply["type"], 0) + 1
                    socks.append(pub)
                except websockets.ConnectionClosed as exc:
                    code = exc.rcvd.code if exc.rcvd else -1
                    codes[code] = codes.get(code, 0) + 1
            for s in socks:
                await s.close()
            return f"{codes}"
        return asyncio.run(body())

    def hijack() -> str:
        async def body() -> str:
            owner, _ = await _publisher(announce("abuse/owned"))
            thief, reply = await _publisher({**announce("abuse/owned"), "host": "thief:9"})
            host = http.get("/api/v1/runs/abuse/owned").json()["host"]
            await thief.close()
            await owner.close()
            return f"thief got {reply['type']}; host still {host}"
        return asyncio.run(body())

    def cross_site() -> str:
        r = http.post("/api/v1/runs/demo/pause", content=b"{}", headers={
            "Content-Type": "text/plain", "Origin": "http://evil.example"})
        status = http.get("/api/v1/runs/demo").json()["status"]
        return f"{r.status_code}; run {status}"

    def rebinding() -> str:
        r = http.get("/api/v1/runs", headers={"Host": "evil.example"})

        async def upgrade() -> str:
            try:
                await websockets.connect(ws + "/ws", additional_headers={"Host": "evil.example"})
            except websockets.InvalidStatus as exc:
                return str(exc.response.status_code)
            return "101"
        return f"REST {r.status_code}, /ws {asyncio.run(upgrade())}"

    def huge_ints() -> str:
        a = http.get("/api/v1/runs/demo/history/data?from=" + str(10**24)).status_code
        b = http.get("/api/v1/runs/demo/history/frame?step=" + str(10**24)).status_code
        return f"from {a}, step {b}"

    def deep_json() -> str:
        async def body() -> str:
            viewer = await websockets.connect(ws + "/ws")
            await viewer.recv()
            await viewer.send("[" * 5000 + "]" * 5000)
            reply = json.loads(await viewer.recv())
            try:
                await viewer.recv()
            except websockets.ConnectionClosed as exc:
                return f"{reply['type']}, close {exc.rcvd.code if exc.rcvd else '?'}"
            return f"{reply['type']}, still open"
        return asyncio.run(body())

    def malformed_publisher_frame() -> str:
        async def body() -> str:
            pub, _ = await _publisher(announce("abuse/malformed"))
            await pub.send(b"\x00\x01")
            reply = None
            while reply is None or reply.get("type") == "plan":
                reply = json.loads(await asyncio.wait_for(pub.recv(), 5))
            await pub.close()
            return f"publisher got {reply['type']}, socket open"
        return asyncio.run(body())

    return {
        "1 history/data heads=0 x 10,000": dup_heads("data?"),
        "1 history/data json heads=0 x 10,000": dup_heads("data?format=json&"),
        "1 history/frame heads=0 x 10,000": dup_heads("frame?step=1000&"),
        "1 capture heads=[0]*1024, 4 kinds, 64x24": capture_dups,
        "2 publisher frame shape [8, 8]": bad_frame(),
        "3 announce heads=10**7": big_announce(heads=10**7),
        "3 announce 300,000 layers": big_announce(layers=300_000),
        "3 300 publisher sockets": many_publishers,
        "4 second publisher, same run id": hijack,
        "5 POST pause text/plain, Origin evil": cross_site,
        "5 Host: evil.example (REST, /ws)": rebinding,
        f"6 capture flood {capture_seconds:g} s (budget 64 MiB)": capture_flood,
        "8 from=10**24, step=10**24": huge_ints,
        "9 5000-deep JSON on /ws": deep_json,
        "9 malformed publisher frame": malformed_publisher_frame,
    }


def token_printed() -> str:
    """Item 7: a user-supplied token must not reach stdout."""
    token = "user-supplied-token-0123456789"
    env = {**os.environ, "ATTNSCOPE_TOKEN": token}
    proc = subprocess.Popen([sys.executable, "-m", attnscope.cli.__name__, "serve", "--port",
                             str(free_port())], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    time.sleep(4)
    proc.terminate()
    out, err = proc.communicate(timeout=20)
    return "printed" if token in out + err else "not printed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capture-seconds", type=float, default=10.0)
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as data:
        env = {**os.environ, "ATTNSCOPE_DEVICE": "cpu", "ATTNSCOPE_DATA_DIR": data,
               "ATTNSCOPE_MAX_CAPTURE_BYTES": str(64 * MiB), "ATTNSCOPE_TORCH_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-m", attnscope.cli.__name__, "demo", "--port",
                                 str(port), "--no-browser", "--max-rate", "8"], env=env,
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    runs = httpx.get(url + "/api/v1/runs", timeout=1).json()
                    if runs and (runs[0]["step"] or 0) > 20:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("the demo did not start")
                time.sleep(0.3)
            print(f"attnscope demo pid {proc.pid}, RSS {status_kb(proc.pid, 'VmRSS') / 1024:.0f}"
                  f" MB, load average {os.getloadavg()[0]:.1f}")
            print("| attack | answer | peak RSS growth | health p50 / p99 / max | took |")
            print("|---|---|---|---|---|")
            for name, attack in attacks(url, args.capture_seconds).items():
                m = measure(proc.pid, url, attack)
                errors = f", {m['health_errors']} health errors" if m["health_errors"] else ""
                print(f"| {name} | {m['answer']} | {m['rss_mb']:.1f} MB | {m['p50']:.1f} / "
                      f"{m['p99']:.1f} / {m['max']:.1f} ms{errors} | {m['seconds']:.1f} s |",
                      flush=True)
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=30)
        print(f"| 7 user-supplied ATTNSCOPE_TOKEN on stdout | {token_printed()} | | | |")
        tracebacks = err.count("Traceback")
        print(f"server log: {len(err.splitlines())} lines, {tracebacks} tracebacks, "
              f"{err.count('1011')} mentions of 1011")


if __name__ == "__main__":
    main()
