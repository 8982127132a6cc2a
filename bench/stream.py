"""Does watching slow training down? Demo training steps/s with and without the stream.

Measured side by side in one run, interleaved (a, b, c, d, a, b, ...), median of
``--repeats`` windows of ``--seconds`` each:

(a) no dashboard: the demo's training loop alone;
(b) the dashboard (its server in a process of its own, as ``Dashboard.start`` and
    ``attnscope demo`` run it) with one subscriber to all layers and heads at 10 fps
    (kinds attention, head_stats, scalars, head_roles: as the page);
(c) the same with 20 subscribers;
(d) one stalled subscriber (a raw socket that subscribes as in (b) and never
    reads);
(B), (C), (D) as (b), (c), (d) with the server in threads of the training process
    (``server_process=False``, the design before), with ``--in-process-too``.

Subscribers run in a separate process (as browsers would), and record the
latency from dispatch (the ``time`` in each frame header, taken in the
training thread) to reception, and from the end of the step (``Run.step``,
when frames are released with their step number and token labels) to
reception: p50 and p95 for (b) and (c).
Finally the size of one 4-layer x 4-head x 128 x 128 attention update as
binary frames (float16 and uint8) and as JSON.

    .venv/bin/python bench/stream.py                  # full run (~2 min)
    .venv/bin/python bench/stream.py --in-process-too # both designs side by side
    .venv/bin/python bench/stream.py --seconds 3 --repeats 1   # quick check
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# What the page subscribes to (head_roles: a "heads" message when roles change, <= 1/s).
SUBSCRIBE = {"type": "subscribe", "run": "demo",
             "kinds": ["attention", "head_stats", "scalars", "head_roles"], "max_fps": 10}
STALLED = SUBSCRIBE  # the same subscription as (b), never read


# -- subscriber process ---------------------------------------------------------

async def _subscriber(url: str, deadline: float, stats: dict, run: str = "demo") -> None:
    import websockets

    from attnscope.contract.protocol import decode_frame

    async with websockets.connect(url, max_size=None, compression=None) as ws:
        await ws.recv()  # hello
        await ws.send(json.dumps({**SUBSCRIBE, "run": run}))
        while (left := deadline - time.time()) > 0:
            try:
                msg = await asyncio.wait_for(ws.recv(), left)
            except TimeoutError:
                break
            now = time.time()
            stats["messages"] += 1
            stats["bytes"] += len(msg)
            if isinstance(msg, bytes):
                header, _ = decode_frame(msg)
                stats["latency"].append(now - header["time"])
                stats["received"].append((header["step"], now))


def client_main(url: str, n: int, seconds: float, run: str = "demo") -> None:
    """``n`` subscribers to ``run`` for ``seconds``; prints what they received as JSON."""
    stats = {"messages": 0, "bytes": 0, "latency": [], "received": []}
    deadline = time.time() + seconds

    async def run_all() -> None:
        await asyncio.gather(*(_subscriber(url, deadline, stats, run) for _ in range(n)))

    asyncio.run(run_all())
    print(json.dumps(stats))


# -- training side ------------------------------------------------------------------

def _stalled_socket(url: str) -> socket.socket:
    sys.path.insert(0, str(ROOT / "tests" / "server"))
    from stream_support import raw_stalled_client

    return raw_stalled_client(url, STALLED)


def _measure(training, run, seconds: float) -> dict:
    """Steps/s (wall clock) and the training thread's CPU time per step (less noisy)."""
    step_fn = training.step
    start, cpu0 = time.perf_counter(), time.thread_time()
    steps = 0
    while (elapsed := time.perf_counter() - start) < seconds:
        r = step_fn()
        if run is not None:  # a dashboard (or a run) marks the step
            run.step(r.step, loss=r.loss, tokens=r.tokens, accuracy=r.accuracy)
        steps += 1
    return {"steps_per_s": steps / elapsed,
            "cpu_ms_per_step": (time.thread_time() - cpu0) * 1000 / steps}


def one_window(mode: str, seconds: float, device: str) -> dict:
    from attnscope import Dashboard
    from attnscope.settings import Settings
    from attnscope.training.demo import DemoConfig, DemoTraining
    from attnscope.training.run import Run
    from transformer_core.events import EventDispatcher

    dispatcher = EventDispatcher()
    training = DemoTraining(DemoConfig(device=device), event_dispatcher=dispatcher)
    for _ in range(3):
        training.step()
    if mode == "a":
        return _measure(training, None, seconds)
    run = Run(training.model, run_id="demo", symbols=training.task.symbols)
    marks: dict[int, float] = {}
    run.add_step_hook(lambda r: marks.__setitem__(r.step_index, time.time()))
    in_process = mode.isupper()
    with tempfile.TemporaryDirectory() as data_dir:
        settings = Settings(port=0, data_dir=data_dir, server_process=not in_process)
        dash = Dashboard.serve(run, settings)
        try:
            return _window(mode.lower(), dash, training, run, marks, seconds)
        finally:
            dash.close()


def _window(mode: str, dash, training, run, marks: dict, seconds: float) -> dict:
    ws_url = dash.url.replace("http://", "ws://") + "/ws"
    client = sock = None
    n = {"b": 1, "c": 20, "d": 0}[mode]
    try:
        if n:
            client = subprocess.Popen(
                [sys.executable, __file__, "--client", ws_url, "--n", str(n),
                 "--seconds", str(seconds + 5)], stdout=subprocess.PIPE, text=True)
        else:
            sock = _stalled_socket(ws_url)
        deadline = time.monotonic() + 30
        # until the subscribers are connected and subscribed (stepping meanwhile): the
        # hub's connections when it runs here, else the plan reaching the training side
        # (then 2 s more for the rest of the 20)
        if dash.registry is not None:
            hub = dash._app.state.hub
            while len([c for c in hub.connections if c.sub]) < max(n, 1):
                if time.monotonic() > deadline:
                    raise RuntimeError("subscribers did not connect")
                r = training.step()
                dash.step(r.step, loss=r.loss, tokens=r.tokens)
        else:
            while not dash._link.publisher.plan.sources:
                if time.monotonic() > deadline:
                    raise RuntimeError("subscribers did not connect")
                r = training.step()
                dash.step(r.step, loss=r.loss, tokens=r.tokens)
        _measure(training, dash, 2.0)  # the stream settles (the rest connect; buffers fill)
        result = _measure(training, dash, seconds)
        if client is not None:
            out, _ = client.communicate(timeout=seconds + 30)
            result.update(json.loads(out))
            result["from_step_end"] = [t - marks[step] for step, t in result.pop("received")
                                       if step in marks]
        return result
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.communicate()
        if sock is not None:
            sock.close()


def update_size() -> dict:
    """Bytes of one 4-layer x 4-head x 128 x 128 attention update, binary vs JSON."""
    import torch

    from attnscope.backend.frames import encode_binary
    from attnscope.training.stream import Capture

    torch.manual_seed(0)
    labels = [f"t{i}" for i in range(128)]
    sizes = {"float16": 0, "uint8": 0, "json": 0, "json_4dp": 0}
    for layer in range(4):
        p = torch.softmax(torch.randn(4, 128, 128) * 3, -1)  # (H, L, S)
        cap = Capture("attention", layer, 0, (0, 1, 2, 3), p.half(), "self", time.time(),
                      step=1, labels=(labels, labels))
        sizes["float16"] += len(encode_binary("demo", cap, None, 128, "float16"))
        sizes["uint8"] += len(encode_binary("demo", cap, None, 128, "uint8"))
        message = {"type": "frame", "run": "demo", "step": 1, "kind": "attention",
                   "layer": layer, "heads": [0, 1, 2, 3], "labels": labels}
        sizes["json"] += len(json.dumps({**message, "data": p.tolist()}))
        sizes["json_4dp"] += len(json.dumps(
            {**message, "data": [[[round(v, 4) for v in row] for row in h] for h in p.tolist()]}))
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="window length (8)")
    parser.add_argument("--repeats", type=int, default=3, help="windows per configuration (3)")
    parser.add_argument("--device", default="cpu", help="demo device (cpu)")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="torch threads, as `attnscope demo` uses (CPU count - 1)")
    parser.add_argument("--in-process-too", action="store_true",
                        help="also (B) (C) (D): the server in threads of the training process")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--run", default="demo", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client_main(args.client, args.n, args.seconds, args.run)
        return
    import torch

    torch.set_num_threads(args.threads)
    print(f"demo training on {args.device}, {torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} CPUs; {args.repeats} x {args.seconds:g} s windows per mode")
    modes = "abcdBCD" if args.in_process_too else "abcd"
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for mode in modes:
            runs[mode].append(one_window(mode, args.seconds, args.device))
            last = runs[mode][-1]
            print(f"  ({mode}) {last['steps_per_s']:.1f} steps/s, training thread "
                  f"{last['cpu_ms_per_step']:.2f} CPU ms/step", flush=True)
    base = statistics.median(r["steps_per_s"] for r in runs["a"])
    names = {"a": "no dashboard", "b": "1 subscriber, all layers/heads, 10 fps",
             "c": "20 subscribers", "d": "1 stalled subscriber",
             "B": "(b), server in threads", "C": "(c), server in threads",
             "D": "(d), server in threads"}
    base_cpu = statistics.median(r["cpu_ms_per_step"] for r in runs["a"])
    print("\n| mode | steps/s (median) | vs (a) | training-thread CPU ms/step | vs (a) |\n"
          "|---|---|---|---|---|")
    for mode in modes:
        rate = statistics.median(r["steps_per_s"] for r in runs[mode])
        cpu = statistics.median(r["cpu_ms_per_step"] for r in runs[mode])
        print(f"| ({mode}) {names[mode]} | {rate:.1f} | {rate / base:.3f}x | {cpu:.2f} | "
              f"{base_cpu / cpu:.3f}x |")
    print()
    for mode in [m for m in modes if m in "bcBC"]:
        for key, what in (("latency", "dispatch"), ("from_step_end", "end of step")):
            values = sorted(x for r in runs[mode] for x in r.get(key, []))
            if values:
                p50 = values[len(values) // 2] * 1000
                p95 = values[int(len(values) * 0.95)] * 1000
                print(f"({mode}) {what} -> client: p50 {p50:.1f} ms, p95 {p95:.1f} ms "
                      f"({len(values)} frames)")
    sizes = update_size()
    print(f"\n4 layers x 4 heads x 128 x 128 attention update: float16 frames "
          f"{sizes['float16']:,} B, uint8 frames {sizes['uint8']:,} B, JSON {sizes['json']:,} B "
          f"(JSON rounded to 4 dp {sizes['json_4dp']:,} B): binary float16 is "
          f"{sizes['json'] / sizes['float16']:.1f}x smaller than JSON")


if __name__ == "__main__":
    main()
