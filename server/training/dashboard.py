"""``Dashboard.start(model)``: watch a model from your own training loop.

Three lines in your loop::

    from attnscope import Dashboard
    dash = Dashboard.start(model)           # serves http://127.0.0.1:8000, prints the URL
    for step, batch in enumerate(loader):
        loss = train_step(model, batch)
        dash.step(step, loss=loss.item())    # marks the step; cheap
"""

from __future__ import annotations

import collections
import html
import logging
import os
import time
import warnings
import weakref
import webbrowser
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch.nn as nn

from .run import Run, RunRegistry, slugify
from .tokens import warn_step_after_close

if TYPE_CHECKING:  # the web side loads in start(), not on import (connect never needs it)
    from ..backend.serving import BackgroundServer
    from ..settings import Settings
    from .link import TrainingLink
    from .process import ChildProcess

logger = logging.getLogger(__name__)


# Dashboards this process serves, by (host, port): starting another on the same port
# replaces the old one (a notebook cell run twice), instead of failing on a port we hold.
_LIVE: dict[tuple[str, int], weakref.ref] = {}


class Dashboard:
    """The dashboard of one run: a server showing the model you passed, in a process of
    its own (or, with ``server_process=False``, in threads of this one).

    Use :meth:`start`; then call :meth:`step` once per training step and
    :meth:`close` at the end (or use it as a context manager).
    """

    def __init__(self, run: Run, url: str, *, process: ChildProcess | None = None,
                 link: TrainingLink | None = None, registry: RunRegistry | None = None,
                 server: BackgroundServer | None = None, app: Any = None,
                 quiet: bool = False) -> None:
        self.run = run
        self.url = url
        self.registry = registry  # in-process only: the server's registry
        self._process = process
        self._link = link
        self._server = server
        self._app = app  # in-process only
        self._quiet = quiet
        self._closed = False
        self._settings: Settings | None = None
        self._token: str | None = None  # the server's token, for the inline page
        self._alert_callbacks: list[Any] = []  # in-process on_alert
        self._alerts_seen: collections.deque | None = None

    @classmethod
    def start(cls, model: nn.Module, port: int = 8000, host: str = "127.0.0.1",
              open_browser: bool = False, name: str | None = None,
              settings: Settings | None = None, quiet: bool = False,
              tokenizer: Any = None, max_overhead: float | None = None,
              server_process: bool | None = None) -> Any:
        """Register ``model`` as a run, serve the dashboard, print its URL.

        ``port=0`` picks a free port (see :attr:`url`); a port in use raises
        :class:`~attnscope.core.sockets.PortInUse` naming it; starting again on a port this
        process already serves (a notebook cell run twice) closes the old dashboard first.
        ``model`` may be any ``nn.Module`` whose attention
        :func:`transformer_core.instrument.instrument` finds: ``transformer_core``, Hugging
        Face, ``nn.MultiheadAttention`` and modules calling ``F.scaled_dot_product_attention``
        (README, "Your model"). ``tokenizer``: a Hugging Face tokenizer; token ids given to
        :meth:`step` are shown as its strings, and captures accept ``text``.
        ``name``: the run's name (default: ``run`` and the time it started, so that every
        run stays listed).
        ``max_overhead``: what the dashboard may cost, a fraction of training time
        (default: ``settings.max_overhead``, ``ATTNSCOPE_MAX_OVERHEAD``, 0.03); past it
        it thins its own work and says so on the page (:mod:`attnscope.training.budget`).
        While nobody watches the run, ``settings.idle_overhead`` (``ATTNSCOPE_IDLE_OVERHEAD``,
        0.01) at most.
        ``server_process``: serve from a child process (default: ``settings.server_process``,
        True): this process then keeps only the capture path, with no thread of ours.
        ``settings`` overrides everything but host and port. Under torchrun / DDP
        only rank 0 serves; the other ranks get a dashboard that does nothing
        (to see every rank, use :meth:`connect` with ``ranks="all"``).
        """
        from ..settings import Settings
        from .connect import SilentDashboard, select_rank

        if not select_rank(0)[0]:
            return SilentDashboard()
        given = settings or Settings()
        update: dict[str, Any] = {"host": host, "port": port}
        if max_overhead is not None:
            update["max_overhead"] = max_overhead
        if server_process is not None:
            update["server_process"] = server_process
        settings = given.model_copy(update=update)
        settings = Settings.model_validate(settings.model_dump())
        generated = settings.token_generated or given.token_generated
        _replace_live(settings.host, settings.port, model)
        # Unnamed runs are told apart by when they started (each stays listed afterwards).
        name = name or time.strftime("run %Y-%m-%d %H:%M:%S")
        run = Run(model, run_id=slugify(name), name=name, tokenizer=tokenizer,
                  max_overhead=settings.max_overhead, idle_overhead=settings.idle_overhead)
        dash = cls.serve(run, settings, tokenizer, quiet=quiet)
        if not quiet:
            # A generated token is shown in the URL (the user has no other way to learn
            # it); a user-supplied one is never printed (it would land in logs).
            token = settings.token_value
            shown = f"{dash.url}/?token={token}" if token is not None and generated else dash.url
            print(f"attnscope dashboard: {shown}", flush=True)  # the user needs the URL
        if open_browser:
            try:
                webbrowser.open(dash.url)
            except Exception:  # no browser is not an error
                logger.info("could not open a browser for %s", dash.url)
        return dash

    @classmethod
    def serve(cls, run: Run, settings: Settings, tokenizer: Any = None,
              quiet: bool = True) -> Dashboard:
        """A dashboard serving ``run`` (made by the caller: the demo's, say) as
        :meth:`start` does; ``quiet``: say nothing when it closes."""
        try:
            dash = cls._serve(run, settings, tokenizer)
        except BaseException:
            run.detach()
            raise
        dash._quiet, dash._settings = quiet, settings
        dash._token = settings.token_value
        if dash._link is not None:
            dash._link.serve_notebook()  # between cells the kernel's loop serves the page
        if settings.port:
            _LIVE[(settings.host, settings.port)] = weakref.ref(dash)
        _LIVE[("model", id(run.model))] = weakref.ref(dash)
        return dash

    @classmethod
    def _serve(cls, run: Run, settings: Settings, tokenizer: Any) -> Dashboard:
        """The server for ``run``: a child process (the default) or threads here."""
        if not settings.server_process:
            from ..backend.app import create_app
            from ..backend.serving import BackgroundServer

            registry = RunRegistry()
            registry.add(run)
            app = create_app(settings, registry)
            server = BackgroundServer(app, settings)
            server.start()
            return cls(run, server.url, registry=registry, server=server, app=app)
        from .link import TrainingLink, hello_message
        from .process import ChildProcess, pickled_tokenizer

        boot = {"role": "server", "settings": _settings_message(settings)}
        link: list[TrainingLink] = []

        def on_channel(channel: Any) -> None:
            if link:  # a restarted server process: the link writes to its channel now
                link[0].reconnect(channel)
                link[0].handle(process.early)

        process = ChildProcess("attnscope.backend.child", boot, lambda: hello_message(run),
                               host=settings.host, port=settings.port,
                               tokenizer=pickled_tokenizer(tokenizer), on_channel=on_channel,
                               on_close=lambda: link[0].channel_closing() if link else None)
        try:
            process.start()
        except BaseException:
            process.stop(timeout=1.0)
            raise
        assert process.channel is not None
        link.append(TrainingLink(run, process.channel))
        link[0].handle(process.early)
        return cls(run, process.url, process=process, link=link[0])

    @classmethod
    def connect(cls, model: nn.Module | str | None = None, /, url: str | None = None,
                run: str | None = None, *, token: str | None = None, name: str | None = None,
                config: dict[str, Any] | None = None, ranks: int | Sequence[int] | str = 0,
                buffer_frames: int = 256, symbols: Sequence[str] | None = None,
                history: bool = True, max_overhead: float | None = None,
                tokenizer: Any = None, **old: Any) -> Any:
        """Publish ``model`` to a running ``attnscope serve`` at ``url`` as run ``run``:
        ``Dashboard.connect(model, "http://HOST:8000", run="alice/lr3e-4")``.

        Same ``.step()`` / ``.close()`` API as :meth:`start`; the network is used by a relay
        process of ours only, fed through shared memory (see
        :mod:`attnscope.training.connect`). ``token``: the
        server's token (default: ``ATTNSCOPE_TOKEN``). Under torchrun / DDP only the
        ranks in ``ranks`` publish (default rank 0); ``ranks="all"`` publishes every
        rank as ``run/rank-N``. The others get a dashboard that does nothing.
        ``tokenizer``: a Hugging Face tokenizer, as in :meth:`start`: token ids given to
        :meth:`step` are shown as its strings, and captures of this run accept ``text``
        (tokenized here). ``symbols``: the model's vocabulary (token id -> label), for
        token labels and for captures given as ``text`` (symbols separated by spaces, or
        one per character), when there is no tokenizer. ``history``: record this run's history
        (here, sent to the server) when the server records history; False saves the
        training process that work (see docs/history.md). ``max_overhead``: what the
        dashboard may cost this process, a fraction of training time (default
        ``ATTNSCOPE_MAX_OVERHEAD``, else 0.03; :mod:`attnscope.training.budget`); while
        nobody watches the run, ``ATTNSCOPE_IDLE_OVERHEAD`` (else 0.01) at most.

        The form of earlier releases, ``Dashboard.connect(url, run, model=model)``,
        still works and warns (``DeprecationWarning``); it goes in the next release.
        """
        from .connect import RemotePublisher, SilentDashboard, rank_run_id, select_rank

        model, url, run = _connect_arguments(model, url, run, old)
        chosen, rank, world = select_rank(ranks)
        if not chosen:
            return SilentDashboard()
        run_id = rank_run_id(run, ranks, rank, world)
        token = token if token is not None else os.environ.get("ATTNSCOPE_TOKEN") or None
        return RemotePublisher(model, url, run_id, name=name if name is None or run_id == run
                               else f"{name} (rank {rank})", token=token, config=config,
                               buffer_frames=buffer_frames, symbols=symbols, history=history,
                               max_overhead=_overhead("max_overhead") if max_overhead is None
                               else max_overhead, idle_overhead=_overhead("idle_overhead"),
                               tokenizer=tokenizer)

    def step(self, step: int, loss: Any = None, tokens: Any = None, **scalars: Any) -> None:
        """Mark the end of training step ``step`` (see :meth:`attnscope.training.run.Run.step`).

        ``tokens``: this batch's token labels, a list of N lists of L strings
        or an (N, L) tensor of ids (then labelled by their numbers).
        Blocks only while the run is paused from the page. After :meth:`close` it does
        nothing (and warns once).
        """
        if self._closed:
            warn_step_after_close(self)
            return
        if self._process is not None:
            self._process.check()  # a monotonic-clock compare; a waitpid once a second
        self.run.step(step, loss=loss, tokens=tokens, **scalars)
        while self._alerts_seen:  # in-process alerts, in the training thread
            alert = self._alerts_seen.popleft()
            for callback in list(self._alert_callbacks):
                try:
                    callback(alert)
                except Exception:  # noqa: BLE001 (the user's callback: logged)
                    logger.exception("attnscope: the on_alert callback %r failed", callback)

    def new_sequence(self) -> None:
        """A new sequence starts (recurrent inference): see
        :meth:`attnscope.training.run.Run.new_sequence`."""
        self.run.new_sequence()

    def on_alert(self, callback: Any) -> Any:
        """Call ``callback(alert)`` for each alert raised on this run (entropy collapse, NaN,
        a dead or uniform head: docs/statistics.md), in the training thread at its next
        step (or between notebook cells), so it may change the learning rate or save a
        checkpoint. ``alert`` is a dict: ``step``, ``rule``, ``layer``, ``head``, ``values``,
        ``text``... Returns ``callback`` (usable as a decorator)."""
        if self._link is not None:
            self._link.alert_callbacks.append(callback)
            return callback
        if self._alerts_seen is None:  # in-process: the writer's thread queues, step() calls
            service = getattr(self._app.state, "history", None) if self._app else None
            if service is None:
                raise RuntimeError("on_alert: this dashboard records no history, so no "
                                   "alerts are raised (history is off, or its data dir is "
                                   "another process's)")
            self._alerts_seen = collections.deque(maxlen=1000)
            run_id = self.run.id
            service.alerts.listeners.append(
                lambda m: self._alerts_seen.append(m) if m.get("run") == run_id else None)
        self._alert_callbacks.append(callback)
        return callback

    def end_run(self) -> None:
        """Mark the run ended and keep the page served (until :meth:`close` or the end of
        this process): what the Trainer callback's ``keep_open`` does."""
        if self._link is not None:
            self._link.end_run()
        self.run.close()

    def close(self) -> None:
        """End the run and stop the server (its history is written first); says where the
        run stays browsable."""
        if self._closed:
            return
        self._closed = True
        if self._link is not None:
            self._link.close()
        self.run.close()
        after = None if self._quiet else self._recorded_message()
        if self._process is not None:
            self._process.stop()
        if self._server is not None:
            self._server.stop()
        self.run.detach()
        for key, ref in list(_LIVE.items()):
            if ref() is self:
                del _LIVE[key]
        if after is not None:
            print(after, flush=True)  # the user needs to know where the run went

    def _recorded_message(self) -> str | None:
        """Where the run's recorded history stays browsable (None: nothing recorded)."""
        from ..backend.history.browse import browse_command, recorded_message

        if self._app is not None:
            return recorded_message(self._app, self.run.id)
        if self._link is None or not self._link.recorded or self._settings is None:
            return None
        return (f"attnscope: run {self.run.id!r} is recorded; browse it after this process "
                f"ends with `{browse_command(self._settings.data_dir)}`")

    def __enter__(self) -> Dashboard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Dashboard({self.url!r}, run={self.run.id!r})"

    # -- between runs, and in notebooks ---------------------------------------------

    def wait(self, timeout: float | None = None) -> None:
        """Keep serving the page's requests that need the model (captures, the text box)
        from this thread, with no training loop: until ``timeout`` seconds, Ctrl-C, or the
        run is closed. In a notebook this is not needed: between cells the kernel's event
        loop serves them."""
        if self._link is None:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self._closed and (deadline is None or time.monotonic() < deadline):
                self.run.call_idle(0.2)  # in-process: jobs queued for the training thread
            return
        self._link.serve_here(timeout)

    def export_html(self, path: str | Any, text: str | None = None, *, tokens: Any = None,
                    **options: Any) -> Any:
        """Every head of this run's model on one input, written to ``path`` as one
        self-contained .html file (docs/standalone.md): ``text`` (tokenized by the run's
        tokenizer) or ``tokens`` (ids), by default the last batch's first sample given to
        :meth:`step`. Runs one forward pass here (call it between steps). ``options`` as
        :func:`attnscope.show` takes them (``view``, ``focus``, ``scale``...)."""
        from .look import show

        tokenizer = None if self.run.tokenizer is None else self.run.tokenizer.tokenizer
        if text is None and tokens is None:
            tokens = self.run.last_tokens(0)
            if tokens is None:
                raise ValueError("export_html: give text= or tokens= (no batch of token ids "
                                 "was given to step() yet)")
        return show(self.run.model, tokenizer, text, tokens=tokens, path=path, **options)

    def _repr_html_(self) -> str:
        """In a notebook: the page itself, inline (an iframe of its URL, logged in when the
        server needs a token)."""
        url = self.url if self._token is None else f"{self.url}/?token={self._token}"
        if self._closed:
            return f"<p>attnscope dashboard {html.escape(self.url)} (closed)</p>"
        return (f'<iframe src="{html.escape(url)}" width="100%" height="820" '
                'style="border:1px solid #ccc;border-radius:4px" '
                'title="attnscope dashboard"></iframe>'
                f'<p><a href="{html.escape(url)}" target="_blank">open {html.escape(self.url)} '
                "in a tab</a></p>")


def _settings_message(settings: Settings) -> dict[str, Any]:
    """``settings`` as JSON for the server process, the token in clear (it travels in
    shared memory, never on a command line)."""
    data = settings.model_dump(mode="json")
    data["token"] = settings.token_value
    return data


def _overhead(setting: str) -> float:
    """A budget setting (``max_overhead``, ``idle_overhead``) for a process that publishes to
    another's server: its environment variable, else the setting's default."""
    from ..settings import Settings
    from .budget import overhead_from_env

    return overhead_from_env(setting, Settings.model_fields[setting].default)


def _replace_live(host: str, port: int, model: nn.Module) -> None:
    """Close the dashboard this process already serves on (host, port), or of ``model``
    (a notebook cell run again), if any."""
    for key, where in (((host, port), f"on {host}:{port}"),
                       (("model", id(model)), "of this model")):
        ref = _LIVE.pop(key, None) if key[1] else None
        old = None if ref is None else ref()
        if old is not None and not old._closed and \
                (key[0] != "model" or old.run.model is model):
            logger.warning("attnscope: closing the dashboard already %s to start this one",
                           where)
            old.close()


def _connect_arguments(model: Any, url: str | None, run: str | None,
                       old: dict[str, Any]) -> tuple[nn.Module, str, str]:
    """(model, url, run) of a ``Dashboard.connect`` call, new form or old."""
    unknown = sorted(set(old) - {"model"})
    if unknown:
        raise TypeError(f"Dashboard.connect: unexpected keyword arguments {unknown}")
    legacy = isinstance(model, str) or "model" in old
    if isinstance(model, str):  # connect(url, run, model=...): url and run move left
        model, url, run = old.get("model"), model, url if run is None else run
    elif "model" in old:  # connect(url=..., run=..., model=...)
        if model is not None:
            raise TypeError("Dashboard.connect: the model is given twice")
        model = old["model"]
    if model is None:
        raise TypeError("Dashboard.connect: pass the model to publish: "
                        "Dashboard.connect(model, url, run=...)")
    if not isinstance(url, str) or not isinstance(run, str):
        raise TypeError("Dashboard.connect: pass the server's url and the run's name: "
                        "Dashboard.connect(model, url, run=...)")
    if legacy:
        warnings.warn("Dashboard.connect(url, run=..., model=model) is deprecated; call "
                      "Dashboard.connect(model, url, run=...)", DeprecationWarning, stacklevel=3)
    return model, url, run
