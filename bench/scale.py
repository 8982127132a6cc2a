"""Does watching slow down a model of the size people train? Steps/s with and without.

A transformer_core encoder (default: GPT-2-small's shape, 12 layers x 12 heads,
d_model 768, feed-forward 3072, L=512, batch 1), trained with SGD on random
inputs (an MSE loss), ``torch.set_num_threads(1)`` on the CPU as the README
advises on 2 cores. Training steps/s in one process, in interleaved windows
(a b c, c b a, ...), median of ``--repeats`` windows per mode:

(a) no dashboard: the model alone, nobody listening;
(b) ``Dashboard.start(model)`` with history on (the default: head statistics
    every step, a probe snapshot every 10 steps), nobody watching;
(c) (b) plus one viewer on every layer and head (attention, head_stats,
    scalars at 10 fps), a websocket client in a separate process
    (``bench/stream.py --client``);
(B), (C) as (b), (c) with the server in threads of the training process
    (``server_process=False``: the design before the server had its own process).

``--launch-bound`` trains a stand-in for a GPU step's CPU side on the CPU: 12 tiny
layers (d_model 64, L=32, batch 2), ~1,500 small ops and a few tens of milliseconds a
step, where a thread of ours competing for the GIL shows as it would on a GPU.

``--decompose`` adds where (b)'s cost comes from (for a GPU, where the cost is not
in the work the budget counts): (s) the server alone (history off), (r) the
history recorder's training-thread side alone (no writer thread, no server), and
(g) (b) with ``sys.setswitchinterval(0.5 ms)`` during its windows (a launch-bound
training thread gives up the GIL at every kernel and may wait up to the default
5 ms each time a helper thread runs Python).

Each mode trains its own copy of the model (same weights); the dashboards of
(b) and (c) are started once and kept, as in a training run: they get
``--warmup`` unmeasured steps first (the first snapshot, the cost budget
settling), then the windows. A window ends when the history writer has written
its steps (its work belongs to the window). Per window it also reports the CPU
seconds per step of the training thread, of the history writer, of the server
thread and of all other threads (torch's intra-op pool among them), and the
cost the dashboard reports for the same steps (its budget's totals).

    .venv/bin/python bench/scale.py --quick                    # 12x12 L=512, ~6 min
    .venv/bin/python bench/scale.py --launch-bound --modes abcBC # the stand-in, both designs
    .venv/bin/python bench/scale.py                            # longer windows
    .venv/bin/python bench/scale.py --layers 4 --heads 8 --d-model 256 --seq 256 --batch 8
    .venv/bin/python bench/scale.py --seq 1024
    .venv/bin/python bench/scale.py --device cuda --bf16      # skips without CUDA
    .venv/bin/python bench/scale.py --profile                  # where the time goes
    .venv/bin/python bench/scale.py --device cuda --decompose  # where (b)'s cost comes from
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

MODES = {"a": "no dashboard", "b": "Dashboard.start, history on, nobody watching",
         "c": "+ 1 viewer, all layers/heads, 10 fps",
         # the server in threads of the training process (server_process=False: the
         # design before the server moved to a process of its own), side by side
         "B": "(b) with the server in threads of this process",
         "C": "(c) with the server in threads of this process",
         # --decompose: where (b)'s cost comes from
         "s": "server only (history off), nobody watching",
         "r": "history recorder only (training thread; no writer, no server)",
         "g": "(b) with sys.setswitchinterval(0.5 ms) during its windows"}
SWITCH_INTERVAL_S = 0.0005  # mode (g): how soon a thread waiting for the GIL gets it


@dataclass
class StepResult:
    """What a training step returns (as bench/stream.py's trainings do)."""

    step: int
    loss: float
    tokens: None = None
    accuracy: float = 0.0  # a regression loss: no accuracy (a scalar all the same)


class Training:
    """SGD on a transformer_core encoder of the given shape, random (N, L, E) inputs."""

    def __init__(self, args: argparse.Namespace) -> None:
        from transformer_core.builders import TransformerEncoderBuilder
        from transformer_core.events import EventDispatcher

        d_head = args.d_model // args.heads
        self.dispatcher = EventDispatcher()
        self.device = torch.device(args.device)
        self.model = TransformerEncoderBuilder.from_kwargs(
            n_layers=args.layers, n_heads=args.heads, query_dimensions=d_head,
            value_dimensions=d_head, feed_forward_dimensions=args.ff,
            event_dispatcher=self.dispatcher).get().to(self.device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(args.batch, args.seq, args.d_model, generator=g).to(self.device)
        self.y = torch.randn(args.batch, args.seq, args.d_model, generator=g).to(self.device)
        self.bf16 = args.bf16
        self.index = 0

    def step(self) -> StepResult:
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = torch.nn.functional.mse_loss(self.model(self.x).float(), self.y)
        loss.backward()
        self.opt.step()
        self.index += 1
        # .item() syncs with the device once per step, as a training loop that logs does
        return StepResult(self.index, loss.item())


# -- CPU time per thread ---------------------------------------------------------------

def _thread_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of every thread of this process, by native id."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _groups(before: dict[int, float], after: dict[int, float]) -> dict[str, float]:
    """CPU seconds between two :func:`_thread_cpu` readings, grouped by thread role."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    me = threading.get_native_id()
    out = {"training": 0.0, "history writer": 0.0, "server": 0.0, "other": 0.0}
    for tid, cpu in after.items():
        used = cpu - before.get(tid, 0.0)
        name = names.get(tid, "")
        group = ("training" if tid == me else "history writer" if name == "attnscope-history"
                 else "server" if name == "attnscope-server" else "other")
        out[group] += used
    return out


# -- windows ---------------------------------------------------------------------------

def _wait_for_viewer(dash, timeout: float = 60.0) -> None:
    """Wait until the dashboard's hub has a subscriber (the client process connected)."""
    hub = dash._server.server.config.app.state.hub
    deadline = time.monotonic() + timeout
    while not [c for c in hub.connections if c.sub]:
        if time.monotonic() > deadline:
            raise RuntimeError("the viewer did not subscribe")
        time.sleep(0.2)


class LoopLag:
    """The worst lateness of a 50 ms timer on the dashboard's event loop since the last
    :meth:`take`: how long any other socket (a second viewer, the REST API) may wait."""

    PERIOD_S = 0.05

    def __init__(self, loop) -> None:
        import asyncio

        self.worst = 0.0
        self._stop = False
        self._loop = loop
        self._future = asyncio.run_coroutine_threadsafe(self._tick(), loop)

    async def _tick(self) -> None:
        import asyncio

        while not self._stop:
            t = self._loop.time()
            await asyncio.sleep(self.PERIOD_S)
            self.worst = max(self.worst, self._loop.time() - t - self.PERIOD_S)

    def take(self) -> float:
        worst, self.worst = self.worst, 0.0
        return worst

    def close(self) -> None:
        self._stop = True


class Mode:
    """One mode's own model (same weights in every mode) and, for (b) and (c), its
    dashboard, started once and kept for the whole run, as a training run keeps it: its
    cost budget settles during the warm-up and stays settled between windows."""

    def __init__(self, mode: str, args: argparse.Namespace, data_dir: str) -> None:
        from attnscope import Dashboard
        from attnscope.settings import Settings

        self.mode = mode
        self.in_process = False
        torch.manual_seed(0)
        self.training = Training(args)
        self.dash = self.client = self.lag = self.run = self.recorder = None
        if mode == "a":
            return
        extra = {} if args.max_overhead is None else {"max_overhead": args.max_overhead}
        if mode == "r":
            self.run, self.recorder = _recorded_run(self.training.model,
                                                    extra.get("max_overhead", 0.03))
            return
        if mode == "s":
            extra["history_enabled"] = False
        self.in_process = mode in "BCrsg"
        settings = Settings(data_dir=os.path.join(data_dir, mode),
                            server_process=not self.in_process, **extra)
        self.dash = Dashboard.start(self.training.model, port=0, quiet=True, settings=settings)
        if self.in_process:
            self.lag = LoopLag(self.dash._server.server.config.app.state.hub._loop)
        if mode in "cC":
            url = self.dash.url.replace("http://", "ws://") + "/ws"
            self.client = subprocess.Popen(
                [sys.executable, str(ROOT / "bench" / "stream.py"), "--client", url, "--n", "1",
                 "--seconds", "86400", "--run", self.dash.run.id], stdout=subprocess.DEVNULL)
            self._wait_for_viewer()

    def _wait_for_viewer(self, timeout: float = 60.0) -> None:
        """Until the viewer (the client process) subscribed: the hub has it (server in
        threads here), or its plan reached the training side (read at a step)."""
        if self.in_process:
            _wait_for_viewer(self.dash, timeout)
            return
        deadline = time.monotonic() + timeout
        while not self.dash._link.publisher.plan.sources:
            if time.monotonic() > deadline:
                raise RuntimeError("the viewer did not subscribe")
            self._one()

    def steps(self, n: int) -> None:
        """``n`` unmeasured steps (the warm-up)."""
        for _ in range(n):
            self._one()

    def _one(self) -> None:
        r = self.training.step()
        if self.dash is not None:
            self.dash.step(r.step, loss=r.loss)
        elif self.run is not None:
            self.run.step(r.step, loss=r.loss)

    @property
    def budget(self):
        return self.dash.run.budget if self.dash is not None else \
            self.run.budget if self.run is not None else None

    def window(self, seconds: float) -> dict:
        """Steps for ``seconds``, then until the history writer has written them (its work
        for these steps belongs to this window): steps/s, CPU per step by thread role, and
        the cost the dashboard reports for the same steps."""
        history = None if self.dash is None or not self.in_process else \
            self.dash._server.server.config.app.state.history
        budget = self.budget
        spent0 = budget.totals() if budget is not None else None
        dropped0 = 0 if history is None else history.dropped
        recorder = self.recorder if self.dash is None else \
            history.recorders.get(self.dash.run.id) if history is not None else \
            None if self.dash._link is None else self.dash._link._recorder  # (s): no link
        probes0 = 0 if recorder is None else recorder._probes
        if self.lag is not None:
            self.lag.take()
        switch = sys.getswitchinterval()
        if self.mode == "g":
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        before, t0, cpu0 = _thread_cpu(), time.perf_counter(), time.thread_time()
        steps = 0
        try:
            while time.perf_counter() - t0 < seconds:
                self._one()
                steps += 1
            if history is not None:
                history.flush(timeout=600)
        finally:
            sys.setswitchinterval(switch)
        elapsed = time.perf_counter() - t0
        result = {"steps": steps, "seconds": elapsed, "steps_per_s": steps / elapsed,
                  "cpu_ms_per_step": (time.thread_time() - cpu0) * 1000 / steps,
                  "cpu": {k: v / steps for k, v in _groups(before, _thread_cpu()).items()}}
        if budget is not None:
            cost, train = (b - a for a, b in zip(spent0, budget.totals(), strict=True))
            result["cost_s"], result["train_s"] = cost, train
            result["reported"] = cost / train if train > 0 else None
            result["thinning"] = budget.text()
            result["dropped"] = history.dropped - dropped0 if history is not None else 0
            if self.dash is not None and not self.in_process:
                recorder = self.dash._link._recorder  # made at the first step
            result["snapshots"] = 0 if recorder is None else max(0, recorder._probes - probes0)
            measured = budget.status()["measured"]
            result["measured"] = None if measured is None else \
                (measured["slowdown"], measured["error"])
            result["loop_lag_s"] = None if self.lag is None else self.lag.take()
        return result

    def close(self) -> None:
        if self.lag is not None:
            self.lag.close()
        if self.client is not None:
            self.client.kill()
            self.client.wait()
        if self.dash is not None:
            self.dash.close()


class _Discard:
    """A history sink that drops every record (mode (r): the recorder's training-thread
    side alone)."""

    def __init__(self) -> None:
        from attnscope.core.history_config import HistoryConfig

        self.config = HistoryConfig()

    def new_session(self, run_id: str, name: str | None, meta: dict) -> str:
        return "discarded"

    def submit(self, item) -> bool:
        return True


def _recorded_run(model, max_overhead: float):
    """A run of ``model`` and its recorder into :class:`_Discard`, with a cost budget."""
    from attnscope.training.recorder import RunRecorder
    from attnscope.training.run import Run

    run = Run(model, run_id="recorded", max_overhead=max_overhead)
    return run, RunRecorder(run, _Discard())


def table(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        modes = {m: Mode(m, args, data_dir) for m in args.modes}
        try:
            _table(args, modes)
        finally:
            for m in modes.values():
                m.close()


def _table(args: argparse.Namespace, modes: dict[str, Mode]) -> None:
    from attnscope.training.budget import median_and_error

    first = modes["a"].training
    first.step()  # warm-up (allocations, first-call costs)
    t0 = time.perf_counter()
    first.step()
    step_s = time.perf_counter() - t0
    seconds = args.seconds or max(args.min_steps * step_s, 10.0)
    warmup = args.warmup if args.warmup is not None else max(2, round(60 / step_s))
    print(f"{args.layers} layers x {args.heads} heads, d_model {args.d_model}, ff {args.ff}, "
          f"L={args.seq}, batch {args.batch}, {args.device}"
          f"{' bf16 autocast' if args.bf16 else ''}, {torch.get_num_threads()} torch "
          f"threads, {os.cpu_count()} CPUs; one step {step_s:.2f} s; {warmup} warm-up steps "
          f"per dashboard, then {args.repeats} x {seconds:.0f} s windows per mode", flush=True)
    for m, mode in modes.items():
        if mode.budget is not None:
            mode.steps(warmup)
            print(f"  ({m}) after the warm-up: {mode.budget.text()}", flush=True)
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for i in range(args.repeats):
        for mode in (args.modes if i % 2 == 0 else args.modes[::-1]):
            result = modes[mode].window(seconds)
            runs[mode].append(result)
            cpu = ", ".join(f"{k} {v * 1e3:.3g}" for k, v in result["cpu"].items() if v > 0)
            dropped = result.get("dropped")
            lag = result.get("loop_lag_s")
            said = "" if result.get("reported") is None else \
                f"; {result['snapshots']} snapshots" + \
                ("" if lag is None else f"; event loop late by at most {1e3 * lag:.0f} ms") + \
                f"; CPU accounting {100 * result['reported']:.1f} %; the dashboard says: " \
                f"{result['thinning']}"
            print(f"  ({mode}) {result['steps_per_s']:.3f} steps/s over {result['steps']} "
                  f"steps; CPU ms/step: {cpu}"
                  f"{f'; {dropped} history records dropped' if dropped else ''}{said}",
                  flush=True)
    # Over all of a mode's windows together: a snapshot (two probe passes, most of a step
    # at this size) falls in one window of several, so the median of windows would leave
    # it out and a single window overstates it; what a long run pays is the total.
    total = {m: (sum(r["steps"] for r in rs), sum(r["seconds"] for r in rs))
             for m, rs in runs.items()}
    base = total["a"][0] / total["a"][1]
    print("\nAll windows of a mode together (total steps / total time):\n\n"
          "| mode | steps | snapshots | steps/s | vs (a) | slowdown | CPU accounting | "
          "measured by the dashboard | windows vs (a)'s of the same round (median ± error, "
          "range) | "
          "training-thread CPU ms/step | event loop late by (max) |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")
    for mode in modes:
        name = MODES[mode]
        steps, seconds = total[mode]
        rate = steps / seconds
        cpu = sum(r["cpu_ms_per_step"] * r["steps"] for r in runs[mode]) / steps
        cost = sum(r.get("cost_s", 0.0) for r in runs[mode])
        train = sum(r.get("train_s", 0.0) for r in runs[mode])
        said = f"{100 * cost / train:.1f} %" if train > 0 else "-"
        # Each window against the (a) window of its own round (they run back to back): the
        # machine's speed drifts by several % over minutes, a round's windows share it.
        ratios = [r["steps_per_s"] / p["steps_per_s"]
                  for r, p in zip(runs[mode], runs["a"], strict=True)]
        middle, error = median_and_error(ratios)  # as the dashboard's slowdown figure
        snaps = sum(r.get("snapshots", 0) for r in runs[mode])
        lags = [r["loop_lag_s"] for r in runs[mode] if r.get("loop_lag_s") is not None]
        lag = f"{1e3 * max(lags):.0f} ms" if lags else "-"
        last = runs[mode][-1].get("measured")
        measured = "-" if last is None else \
            f"{100 * last[0]:+.1f} ± {100 * last[1]:.1f} %"
        print(f"| ({mode}) {name} | {steps} | {snaps if mode != 'a' else '-'} | "
              f"{rate:.4f} | {rate / base:.3f}x | "
              f"{100 * (base / rate - 1):+.1f} % | {said} | {measured} | "
              f"{middle:.3f}x ± {error:.3f} ({min(ratios):.3f}-{max(ratios):.3f}) | "
              f"{cpu:.0f} | {lag} |")


def profile(args: argparse.Namespace) -> None:
    """Where the time goes with history on and one in-process subscriber-free dashboard:
    the training thread's cProfile over a few steps, CPU per thread, and the writer's
    work (head statistics of one step) timed alone."""
    import cProfile
    import pstats

    from attnscope import Dashboard
    from attnscope.core.history_items import stats_of
    from attnscope.settings import Settings
    from transformer_core.events import AttentionEvent

    training = Training(args)
    training.step()
    with tempfile.TemporaryDirectory() as data_dir:
        dash = Dashboard.start(training.model, port=0, quiet=True,
                               settings=Settings(data_dir=data_dir))
        try:
            r = training.step()
            dash.step(r.step, loss=r.loss)
            before = _thread_cpu()
            prof = cProfile.Profile()
            t0 = time.perf_counter()
            prof.enable()
            for _ in range(args.min_steps):
                r = training.step()
                dash.step(r.step, loss=r.loss)
            prof.disable()
            wall = time.perf_counter() - t0
            cpu = _groups(before, _thread_cpu())
            # one step's writer work, alone: statistics of every layer of sample 0
            copies: dict = {}

            def grab(event: AttentionEvent) -> None:
                copies.setdefault(id(event.source), event.sample_copy(0))

            for d in dash.run.dispatchers:
                d.listen(AttentionEvent, grab)
            training.step()
            for d in dash.run.dispatchers:
                d.remove(grab)
        finally:
            dash.close()
    print(f"{args.min_steps} steps, {wall / args.min_steps:.2f} s/step wall; CPU s/step: "
          + ", ".join(f"{k} {v / args.min_steps:.2f}" for k, v in cpu.items()))
    pstats.Stats(prof).sort_stats("cumulative").print_stats(18)
    from attnscope.core.history_items import StepItem

    layers = dict(enumerate(copies.values()))
    item = StepItem("s", 0, 0.0, {}, layers, len(layers))
    for threads in (1, 2):
        torch.set_num_threads(threads)
        t0, c0 = time.perf_counter(), time.thread_time()
        stats_of([item])
        print(f"writer work of one step (stats_of, {threads} torch threads): "
              f"{time.perf_counter() - t0:.2f} s wall, {time.thread_time() - c0:.2f} s "
              "CPU of the calling thread")
    torch.set_num_threads(args.threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--ff", type=int, default=None, help="feed-forward (4 x d_model)")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    parser.add_argument("--repeats", type=int, default=3, help="windows per mode (3)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="window length (default: --min-steps steps, at least 10 s)")
    parser.add_argument("--min-steps", type=int, default=12, help="steps per window (12)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="unmeasured steps per dashboard first (default: about 60 s)")
    parser.add_argument("--launch-bound", action="store_true",
                        help="a stand-in for a GPU step's CPU side: 12 layers, d_model 64, "
                             "L=32, batch 2 (~1,500 small ops a step)")
    parser.add_argument("--quick", action="store_true",
                        help="2 windows per mode of ~4 steps (GPT-2 small on 1 CPU: ~9 min)")
    parser.add_argument("--profile", action="store_true", help="where the time goes")
    parser.add_argument("--modes", default="abc",
                        help="which modes, in window order: " + "; ".join(
                            f"{k} {v}" for k, v in MODES.items()) + " (abc)")
    parser.add_argument("--decompose", action="store_true",
                        help="where (b)'s cost comes from: --modes asrbg")
    parser.add_argument("--max-overhead", type=float, default=None,
                        help="the dashboard's cost budget (ATTNSCOPE_MAX_OVERHEAD; default 0.03)")
    args = parser.parse_args()
    if args.launch_bound:
        args.layers, args.heads, args.d_model, args.seq, args.batch = 12, 4, 64, 32, 2
        args.seconds = args.seconds or 10.0
    args.ff = args.ff or 4 * args.d_model
    if args.quick:
        args.repeats, args.min_steps = 2, 4
    if args.decompose:
        args.modes = "asrbg"
    if "a" not in args.modes or set(args.modes) - set(MODES):
        parser.error(f"--modes: letters of {''.join(MODES)}, with a (the baseline); "
                     f"got {args.modes!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available here (torch "
              f"{torch.__version__}); nothing measured")
        return
    torch.set_num_threads(args.threads)
    if args.profile:
        profile(args)
    else:
        table(args)


if __name__ == "__main__":
    main()
