"""What does history cost? Training speed, disk, and the page's slider response.

1. **Recording cost**: demo training (``DemoTraining``, default config) marked
   with ``Run.step`` as the demo run does, (a) without history and (b) with a
   :class:`HistoryWriter` at the defaults (probe snapshot every 10 steps, head
   statistics every step, the 3 % cost budget): two copies of the model, one
   recorded by one recorder for half the run (after a warm-up), then the other.
   Pairs of adjacent windows, in alternating order
   (a b, b a, a b, ...); the figure is the median over pairs of b / a (this
   machine's speed drifts by 10% within seconds: adjacent windows share the
   drift), the ratio of the medians is printed too. Target b >= 0.97 x a. The
   cost per step is 1/b - 1/a (medians).
2. **Disk per 1,000 steps** for a 4-layer x 4-head model at L=32 and a 12 x 12
   model at L=256 (d_head 64): the recorder runs on the real model for a few
   steps with a snapshot every step to measure one snapshot file, then 1,000
   stats rows of that shape are written to a fresh store; the figure is
   100 snapshots (1,000 steps at K=10) + 1,000 stats rows + the index, and the
   steady state (``max_snapshots`` = 200 files) is given too.
3. **Slider response**: the demo server (a subprocess, snapshot every 2 steps),
   headless Chromium on its page; the slider is moved to random recorded steps
   and the time from the input event to the frame after the new heatmaps are
   drawn (``__attnscope.history.lastResponseMs``) is collected; p50 / p95.
   Target < 100 ms.

    .venv/bin/python bench/history.py                        # everything (~2 min)
    .venv/bin/python bench/history.py --seconds 0.5 --repeats 6 --skip-browser   # quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def _train_window(training, run, seconds: float) -> tuple[float, float]:
    """(steps per second, training-thread CPU seconds per step) of the demo loop marked
    with ``run.step``, over ``seconds``."""
    steps, start, cpu = 0, time.perf_counter(), time.thread_time()
    while time.perf_counter() - start < seconds:
        result = training.step()
        run.step(result.step, loss=result.loss, tokens=result.tokens, accuracy=result.accuracy)
        steps += 1
    return steps / (time.perf_counter() - start), (time.thread_time() - cpu) / steps


def recording_cost(seconds: float, repeats: int, warmup: float = 5.0) -> dict:
    """Two copies of the demo model (the same seed), trained in alternating windows; one
    of them is recorded for a whole half of the run, by one recorder (as a user's run is:
    its first snapshot and its budget's first windows are in the warm-up, not in every
    window). The copies swap roles at half time, since two instances differ in speed by
    up to 2 % on their own."""
    from attnscope.backend.history.store import HistoryStore
    from attnscope.backend.history.writer import HistoryWriter
    from attnscope.core.history_config import HistoryConfig
    from attnscope.training.demo import DemoConfig, DemoTraining
    from attnscope.training.run import Run
    from transformer_core.events import EventDispatcher

    trainings = [DemoTraining(DemoConfig(device="cpu"), event_dispatcher=EventDispatcher())
                 for _ in range(2)]
    runs = [Run(t.model, run_id=f"demo{i}", symbols=t.task.symbols)
            for i, t in enumerate(trainings)]
    config = HistoryConfig()
    off, on = [], []
    with tempfile.TemporaryDirectory() as data:
        store = HistoryStore(data, max_snapshots=config.max_snapshots,
                             max_bytes=config.max_bytes)
        service = HistoryWriter(store, config)
        for recorded in (0, 1):
            other = 1 - recorded
            service.attach(runs[recorded])
            try:
                _train_window(trainings[recorded], runs[recorded], warmup)  # settles
                _train_window(trainings[other], runs[other], 1.0)
                for i in range(max(1, repeats // 2)):
                    for r in (recorded, other) if i % 2 == 0 else (other, recorded):
                        (on if r == recorded else off).append(
                            _train_window(trainings[r], runs[r], seconds))
            finally:
                service.detach(runs[recorded].id)
        service.flush()
        snapshots = sum(s["snapshots"] for s in store.sessions())
        dropped = service.dropped
        service.close()
    rates_off, rates_on = [r for r, _ in off], [r for r, _ in on]
    a, b = statistics.median(rates_off), statistics.median(rates_on)
    paired = statistics.median(y / x for x, y in zip(rates_off, rates_on, strict=True))
    cpu_off, cpu_on = statistics.median(c for _, c in off), statistics.median(c for _, c in on)
    return {"off": a, "on": b, "ratio": paired, "ratio_of_medians": b / a,
            "cpu_ms": (1e3 * cpu_off, 1e3 * cpu_on), "cost_ms": 1e3 * (1 / b - 1 / a),
            "snapshots": snapshots, "dropped": dropped, "windows": (rates_off, rates_on)}


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def disk_per_1000(layers: int, heads: int, length: int, d_head: int) -> dict:
    """Bytes of history per 1,000 steps at the defaults, measured on a real model."""
    import numpy as np

    from attnscope.backend.history.store import STAT_NAMES, HistoryStore, StatRow
    from attnscope.backend.history.writer import HistoryWriter
    from attnscope.core.history_config import HistoryConfig
    from attnscope.training.run import Run
    from transformer_core.builders import TransformerEncoderBuilder
    from transformer_core.events import EventDispatcher

    model = TransformerEncoderBuilder.from_kwargs(
        n_layers=layers, n_heads=heads, query_dimensions=d_head, value_dimensions=d_head,
        feed_forward_dimensions=4 * heads * d_head, dropout=0.0, attention_dropout=0.0,
        event_dispatcher=EventDispatcher()).get().eval()
    run = Run(model, run_id="disk")
    x = torch.randn(1, length, heads * d_head)
    with tempfile.TemporaryDirectory() as data:
        service = HistoryWriter(HistoryStore(data), HistoryConfig(every=1))
        service.attach(run)
        t0 = time.perf_counter()
        with torch.no_grad():
            for step in range(3):
                model(x)
                run.step(step, loss=1.0)
        train_thread_s = (time.perf_counter() - t0) / 3
        service.flush()
        session = service.session_of("disk")
        files = sorted((Path(data) / "files" / session).iterdir())
        snapshot_bytes = statistics.median(p.stat().st_size for p in files)
        service.close()
    with tempfile.TemporaryDirectory() as data:
        store = HistoryStore(data)
        s = store.new_session("disk", None, {"layers": layers, "heads": heads})
        rows = [StatRow(i, time.time(), {"loss": 1.0 / (i + 1), "accuracy": 0.5},
                        np.random.rand(layers, len(STAT_NAMES), heads).astype(np.float32))
                for i in range(1000)]
        for i in range(0, 1000, 50):  # as the writer does: batches of rows
            store.add_stats(s.id, rows[i: i + 50])
        store.close()
        stats_bytes = _dir_bytes(Path(data))
    every = HistoryConfig().every
    return {"snapshot_bytes": snapshot_bytes, "stats_bytes_per_1000": stats_bytes,
            "per_1000": 1000 // every * snapshot_bytes + stats_bytes,
            "steady_snapshots": HistoryConfig().max_snapshots * snapshot_bytes,
            "step_with_snapshot_s": train_thread_s}


MOVE = """(i) => { window.__attnscope.history.lastResponseMs = null;
  const s = document.getElementById('history-slider');
  s.value = String(i); s.dispatchEvent(new Event('input')); }"""


def slider_response(moves: int) -> dict:
    import random

    from playwright.sync_api import sync_playwright

    sys.path.insert(0, str(ROOT / "tests"))
    from browser.conftest import CHROMIUM, CHROMIUM_ARGS, demo_server, free_port

    with tempfile.TemporaryDirectory() as data:
        os.environ["ATTNSCOPE_DATA_DIR"] = data
        os.environ["ATTNSCOPE_HISTORY_EVERY"] = "2"
        server = demo_server(free_port(), "bench-history").start()
        times: list[float] = []
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(server.url + "/")
                page.wait_for_function("() => window.__attnscope && "
                                       "window.__attnscope.history.steps.length >= 20",
                                       timeout=120_000)
                n = page.evaluate("() => window.__attnscope.history.steps.length")
                rng = random.Random(0)
                for _ in range(moves):
                    i = rng.randrange(n)
                    page.evaluate(MOVE, i)
                    page.wait_for_function("() => window.__attnscope.history.lastResponseMs "
                                           "!== null", timeout=10_000)
                    times.append(page.evaluate("() => window.__attnscope.history.lastResponseMs"))
                browser.close()
        finally:
            server.stop()
    times.sort()
    return {"p50": statistics.median(times), "p95": times[int(0.95 * (len(times) - 1))],
            "max": times[-1], "moves": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per window (1)")
    parser.add_argument("--repeats", type=int, default=30, help="windows per variant (30)")
    parser.add_argument("--moves", type=int, default=40, help="slider moves (40)")
    parser.add_argument("--warmup", type=float, default=5.0,
                        help="seconds recorded before the first window of each half (5)")
    parser.add_argument("--skip-browser", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))

    cost = recording_cost(args.seconds, args.repeats, args.warmup)
    print(f"recording cost (demo, CPU, {torch.get_num_threads()} threads): "
          f"off {cost['off']:.1f} steps/s, on {cost['on']:.1f} steps/s, "
          f"ratio {cost['ratio']:.3f} (median of {len(cost['windows'][0])} adjacent pairs; "
          f"target >= 0.97; ratio of medians {cost['ratio_of_medians']:.3f}), "
          f"{cost['cost_ms']:.3f} ms/step; "
          f"{cost['snapshots']} snapshots recorded, {cost['dropped']} records dropped")
    cpu_off, cpu_on = cost["cpu_ms"]
    print(f"  training-thread CPU per step: off {cpu_off:.3f} ms, on {cpu_on:.3f} ms "
          f"(+{cpu_on - cpu_off:.3f} ms, ratio {cpu_off / cpu_on:.3f})")
    print("  windows off:", " ".join(f"{v:.0f}" for v in cost["windows"][0]),
          "| on:", " ".join(f"{v:.0f}" for v in cost["windows"][1]))
    for layers, heads, length, d_head in ((4, 4, 32, 16), (12, 12, 256, 64)):
        d = disk_per_1000(layers, heads, length, d_head)
        print(f"disk {layers}x{heads} L={length}: snapshot {d['snapshot_bytes'] / 1024:.1f} KiB, "
              f"stats {d['stats_bytes_per_1000'] / 1024:.1f} KiB per 1,000 steps, "
              f"total {d['per_1000'] / 2**20:.2f} MiB per 1,000 steps (K=10); "
              f"steady state {d['steady_snapshots'] / 2**20:.1f} MiB of snapshots (200)")
    if not args.skip_browser:
        r = slider_response(args.moves)
        print(f"slider response (demo 1x4 L=24, overview): p50 {r['p50']:.1f} ms, "
              f"p95 {r['p95']:.1f} ms, max {r['max']:.1f} ms over {r['moves']} moves "
              "(target < 100 ms)")


if __name__ == "__main__":
    main()
