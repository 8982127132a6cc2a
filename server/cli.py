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
import time
import webbrowser
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import ValidationError

from . import __version__
from .client import add_capture_arguments, capture_command
from .settings import Settings

if TYPE_CHECKING:  # heavy imports (torch, FastAPI) wait until a command runs: --help is instant
    from .training.demo_run import DemoRun
    from .training.run import Run, RunRegistry


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
    """A progress line in the terminal while the demo trains: called after each step, it
    prints at most once a second (a terminal) or every 10 s (a log)."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self._tty = sys.stderr.isatty()
        self._period = 1.0 if self._tty else 10.0
        self._next = time.monotonic() + self._period
        self._last_step: int | None = None

    def __call__(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self._period
        run = self.run
        step = run.step_index
        rate = "" if step is None or self._last_step is None \
            else f"{(step - self._last_step) / self._period:6.1f} steps/s"
        self._last_step = step
        values = "  ".join(f"{k} {v:.4f}" for k, v in run.scalars.items())
        line = f"{run.status:6s}  step {step if step is not None else '-':>6}  {values}  {rate}"
        if run.error:
            line += f"  error: {run.error}"
        print(("\r" + line + "   ") if self._tty else line, end="" if self._tty else "\n",
              file=sys.stderr, flush=True)

    def done(self) -> None:
        if self._tty:
            print(file=sys.stderr)


class _Terminated(BaseException):  # noqa: N818 (like KeyboardInterrupt, not an error)
    """SIGTERM: raised in the main thread (by uvicorn after its graceful shutdown, or into
    the demo's training loop), a BaseException so that no ``except Exception`` keeps it."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated


def _login(settings: Settings, url: str) -> tuple[str, str]:
    """(the URL that logs in, the one to print): as Jupyter does, a generated token is
    printed in the URL (the user has no other way to learn it); a user-supplied one never
    is (it would land in logs)."""
    login = url if settings.token_value is None else f"{url}/?token={settings.token_value}"
    shown = login if settings.token_generated else url
    hint = "  (token: ATTNSCOPE_TOKEN)" if settings.token_value and not settings.token_generated \
        else ""
    return login, shown + hint


def _serve(settings: Settings, registry: RunRegistry) -> int:
    """``attnscope serve``: the server in the foreground until Ctrl-C or SIGTERM."""
    import uvicorn

    from .backend.app import create_app
    from .backend.serving import uvicorn_config
    from .core.sockets import bind_socket, url_of

    try:
        sock = bind_socket(settings.host, settings.port)
    except OSError as exc:
        print(f"attnscope: {exc}", file=sys.stderr)
        return 1
    server = uvicorn.Server(uvicorn_config(create_app(settings, registry), settings))
    _, shown = _login(settings, url_of(sock))
    print(f"attnscope {__version__}: dashboard at {shown}  (Ctrl-C to stop)", flush=True)
    print(f"runs recorded in {settings.data_dir} are listed on the page", flush=True)
    # uvicorn shuts down gracefully on SIGINT / SIGTERM, then re-raises the signal to
    # the previous handler: KeyboardInterrupt for SIGINT, _Terminated (ours) for SIGTERM.
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        server.run(sockets=[sock])
    except (KeyboardInterrupt, _Terminated):
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    return 0


def _demo(settings: Settings, demo: DemoRun, open_browser: bool) -> int:
    """``attnscope demo``: the demo trains in this process's main thread, as a user's loop
    does; its dashboard serves from a process of its own (Dashboard.start's)."""
    from .core.sockets import PortInUse
    from .training.dashboard import Dashboard

    try:
        dash = Dashboard.serve(demo.run, settings)
    except (PortInUse, OSError) as exc:
        print(f"attnscope: {exc}", file=sys.stderr)
        return 1
    login, shown = _login(settings, dash.url)
    print(f"attnscope {__version__}: dashboard at {shown}  (Ctrl-C to stop)", flush=True)
    if open_browser:
        webbrowser.open(login)
    progress = _Progress(demo.run)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        demo.train_here(mark=dash.step, after_step=progress)
    except (KeyboardInterrupt, _Terminated):
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        progress.done()
        dash.close()
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
    from .training.run import RunRegistry

    if args.command == "serve":
        return _serve(settings, RunRegistry())
    import torch

    from .training.collapse import CollapseConfig
    from .training.demo import DemoConfig
    from .training.demo_run import DemoRun
    from .training.induction import InductionConfig

    torch.set_num_threads(settings.torch_threads or max(1, (os.cpu_count() or 2) - 1))

    configs = {"reverse": DemoConfig, "induction": InductionConfig, "collapse": CollapseConfig}
    rate = args.max_rate if args.max_rate is not None else \
        {"reverse": 8.0, "induction": 20.0, "collapse": 10.0}[args.task]
    try:
        config = configs[args.task](device=settings.device)
        demo = DemoRun(config, max_rate=rate or None, task=args.task,
                       max_overhead=settings.max_overhead,
                       idle_overhead=settings.idle_overhead)
    except ValueError as exc:
        print(f"attnscope: {exc}", file=sys.stderr)
        return 2
    what = {"induction": "learning induction heads",
            "collapse": "raising the learning rate until attention collapses",
            "reverse": f"reversing {demo.config.seq_len} symbols"}[args.task]
    print(f"demo: {what} on {demo.training.device} "
          f"({torch.get_num_threads()} torch threads)", flush=True)
    return _demo(settings, demo, not args.no_browser)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
