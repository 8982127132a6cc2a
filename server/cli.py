"""``attnscope``: ``demo`` (server + demo training run), ``serve`` (server alone) and
``capture`` (a REST capture saved to a file).

Runs in the foreground; Ctrl-C or SIGTERM stops the server and the demo cleanly.
Also runnable as ``python -m attnscope.cli ...``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import webbrowser
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import ValidationError

from . import __version__
from .client import add_capture_arguments, capture_command
from .settings import Settings

if TYPE_CHECKING:  # heavy imports (torch, FastAPI) wait until a command runs: --help is instant
    from .runs import Run, RunRegistry


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnscope", description=(
        "A live window into a transformer while it trains. Settings also come from "
        "ATTNSCOPE_* environment variables (ATTNSCOPE_PORT, ATTNSCOPE_DATA_DIR, ...)."))
    parser.add_argument("--version", action="version", version=f"attnscope {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="train the demo model and serve the dashboard on it",
                          description="Train a small transformer on a task with a known "
                                      "answer and watch its heads learn, live: reverse a "
                                      "sequence (default), continue a repeated one "
                                      "(induction heads), or watch attention entropy "
                                      "collapse under a rising learning rate (collapse).")
    serve = sub.add_parser("serve", help="serve the dashboard alone: browse recorded runs, "
                                         "receive runs that connect",
                           description="Serve the dashboard and its API without a run of its "
                                       "own: every run recorded in the data dir is listed and "
                                       "opens with its history; runs publish to it with "
                                       "Dashboard.connect.")
    for p in (demo, serve):
        p.add_argument("--port", type=int, default=None, help="TCP port (default 8000; 0: any)")
        p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
        p.add_argument("--data-dir", default=None, metavar="DIR",
                       help="where captures and history live, and whose recorded runs the "
                            "page lists (default: ATTNSCOPE_DATA_DIR, else the user data "
                            "folder)")
    demo.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    demo.add_argument("--device", default=None, help="auto (default), cpu or cuda[:N]")
    demo.add_argument("--task", choices=("reverse", "induction", "collapse"), default="reverse",
                      help="reverse: a one-layer model reverses 24 symbols (heads converge in "
                           "seconds); induction: a two-layer attention-only model learns to "
                           "continue repeated random tokens (previous-token and induction "
                           "heads form after ~250-400 steps); collapse: a causal model's "
                           "learning rate rises until its attention entropy collapses "
                           "(~step 270), raising alerts before its loss spikes. Default: "
                           "reverse")
    demo.add_argument("--max-rate", type=float, default=None, metavar="STEPS_PER_S",
                      help="pace training so the heads can be watched forming "
                           "(default 8 steps/s for reverse, 20 for induction, 10 for "
                           "collapse; 0: as fast as possible)")
    capture = sub.add_parser("capture", help="capture a run's attention into a file",
                             description="Run one forward pass of a run's model on the given "
                                         "tokens and save the tensors (npz or safetensors).")
    add_capture_arguments(capture)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port),
                                   ("device", getattr(args, "device", None)),
                                   ("data_dir", getattr(args, "data_dir", None)))
                 if v is not None}
    return Settings(**overrides)


class _Progress:
    """A progress line in the terminal while the demo trains (every second, until stopped)."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self._stop = threading.Event()
        self._tty = sys.stderr.isatty()
        self.thread = threading.Thread(target=self._loop, name="attnscope-progress", daemon=True)

    def _loop(self) -> None:
        last_step, period = None, 1.0 if self._tty else 10.0
        while not self._stop.wait(period):
            run = self.run
            step = run.step_index
            rate = "" if step is None or last_step is None \
                else f"{(step - last_step) / period:6.1f} steps/s"
            last_step = step
            values = "  ".join(f"{k} {v:.4f}" for k, v in run.scalars.items())
            line = f"{run.status:6s}  step {step if step is not None else '-':>6}  {values}  {rate}"
            if run.error:
                line += f"  error: {run.error}"
            print(("\r" + line + "   ") if self._tty else line, end="" if self._tty else "\n",
                  file=sys.stderr, flush=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(2.0)
        if self._tty:
            print(file=sys.stderr)


class _Terminated(Exception):
    """SIGTERM, re-raised by uvicorn after its graceful shutdown."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated


def _serve(settings: Settings, registry: RunRegistry, open_browser: bool,
           progress: _Progress | None) -> int:
    import uvicorn

    from .app import create_app
    from .serving import bind_socket, url_of, uvicorn_config

    try:
        sock = bind_socket(settings.host, settings.port)
    except OSError as exc:
        print(f"attnscope: cannot listen on {settings.host}:{settings.port}: {exc}",
              file=sys.stderr)
        return 1
    url = url_of(sock)
    server = uvicorn.Server(uvicorn_config(create_app(settings, registry), settings))
    login = url if settings.token_value is None else f"{url}/?token={settings.token_value}"
    # As Jupyter does: a generated token is printed in the URL that logs you in (the user
    # has no other way to learn it); a user-supplied one never is (it would land in logs).
    shown = login if settings.token_generated else url
    hint = "  (token: ATTNSCOPE_TOKEN)" if settings.token_value and not settings.token_generated \
        else ""
    print(f"attnscope {__version__}: dashboard at {shown}{hint}  (Ctrl-C to stop)", flush=True)
    if progress is None:  # serve: what it browses
        print(f"runs recorded in {settings.data_dir} are listed on the page", flush=True)
    if open_browser:
        threading.Timer(1.0, webbrowser.open, args=(login,)).start()
    if progress is not None:
        progress.start()
    # uvicorn shuts down gracefully on SIGINT / SIGTERM, then re-raises the signal to
    # the previous handler: KeyboardInterrupt for SIGINT, _Terminated (ours) for SIGTERM.
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        server.run(sockets=[sock])
    except (KeyboardInterrupt, _Terminated):
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        if progress is not None:
            progress.stop()
        sock.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "capture":
        return capture_command(args)
    try:
        settings = _settings(args)
    except ValidationError as exc:
        err = exc.errors()[0]
        print(f"attnscope: invalid setting {'.'.join(map(str, err['loc']))}: {err['msg']}",
              file=sys.stderr)
        return 2
    from .runs import RunRegistry

    registry = RunRegistry()
    if args.command == "serve":
        return _serve(settings, registry, open_browser=False, progress=None)
    import torch

    from .collapse import CollapseConfig
    from .demo import DemoConfig
    from .demo_run import DemoRun
    from .induction import InductionConfig

    torch.set_num_threads(settings.torch_threads or max(1, (os.cpu_count() or 2) - 1))

    configs = {"reverse": DemoConfig, "induction": InductionConfig, "collapse": CollapseConfig}
    rate = args.max_rate if args.max_rate is not None else \
        {"reverse": 8.0, "induction": 20.0, "collapse": 10.0}[args.task]
    try:
        config = configs[args.task](device=settings.device)
        demo = DemoRun(config, max_rate=rate or None, task=args.task,
                       max_overhead=settings.max_overhead)
    except ValueError as exc:
        print(f"attnscope: {exc}", file=sys.stderr)
        return 2
    registry.add(demo.run)
    what = {"induction": "learning induction heads",
            "collapse": "raising the learning rate until attention collapses",
            "reverse": f"reversing {demo.config.seq_len} symbols"}[args.task]
    print(f"demo: {what} on {demo.training.device} "
          f"({torch.get_num_threads()} torch threads)", flush=True)
    demo.start()
    try:
        return _serve(settings, registry, not args.no_browser, _Progress(demo.run))
    finally:
        demo.close()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
