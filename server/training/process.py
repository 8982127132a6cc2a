"""Starting and minding our processes from the training process: :class:`ChildProcess`
(the dashboard's server process, or ``Dashboard.connect``'s relay).

The training process binds the listening socket (so a port in use is an error here,
naming the port, and ``port=0`` is known at once), makes the shared-memory
:class:`~attnscope.contract.channel.Channel`, and starts ``python -m
attnscope.backend.child`` with both inherited, in its own session (the terminal's Ctrl-C
is the training process's to handle). It sends ``boot`` and ``hello`` and waits for
``ready``. No thread of ours is started here.

Lifetimes: the child reads EOF on the channel's doorbell when this process dies, however
it dies, and exits. If the child dies, training goes on (writes to the ring cost the same,
nobody reads them) and :meth:`ChildProcess.check` (called from ``step()`` at most once a
second) notices, starts a new one on the same socket with a fresh channel, or, after
``MAX_RESTARTS``, says so once and stops trying.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from ..contract.channel import Channel
from ..core.sockets import bind_socket, url_of

logger = logging.getLogger(__name__)

# The server process imports torch and the web stack (~2-4 s); then it says ready.
READY_TIMEOUT_S = 60.0
# A dead server process is looked for at most this often (a waitpid: microseconds).
CHECK_EVERY_S = 1.0
# Restarts of a server process that keeps dying, at most; then training goes on without.
MAX_RESTARTS = 3
# close(): the server process gets this long to finish (history written, sockets closed).
STOP_TIMEOUT_S = 10.0
# 64 MiB of shared memory for frames, history records and capture results: a 144-head
# frame pooled to 128 is 4.7 MB, a snapshot's sample copies at L=512 ~6 MB.
CHANNEL_BYTES = 64 << 20


class ServerFailed(RuntimeError):
    """A process of ours did not start; the message says why."""


def pickled_tokenizer(tokenizer: Any) -> torch.Tensor | None:
    """A run's tokenizer as bytes for the server process (None: none, or not picklable:
    the server then labels tokens with the run's symbols)."""
    if tokenizer is None:
        return None
    try:
        raw = pickle.dumps(getattr(tokenizer, "tokenizer", tokenizer))
    except Exception:  # noqa: BLE001 (a tokenizer that does not pickle: symbols instead)
        logger.warning("the tokenizer could not be sent to the dashboard's server process; "
                       "text captures will use the run's symbols", exc_info=True)
        return None
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


class ChildProcess:
    """A process of ours beside the training process (the dashboard's server, or the
    relay of ``Dashboard.connect``) and the channel to it (see the module docstring).

    ``module`` is run with ``-m``; with ``host`` and ``port`` it gets a listening socket
    bound here. ``boot`` and ``hello()`` are the first two messages (``hello`` is called
    again for each restart: the run's state so far); ``on_channel(channel)`` is told of
    each new channel (a restart makes one)."""

    def __init__(self, module: str, boot: dict[str, Any], hello: Callable[[], dict], *,
                 host: str | None = None, port: int | None = None,
                 tokenizer: torch.Tensor | None = None,
                 on_channel: Callable[[Channel], None] | None = None,
                 on_close: Callable[[], None] | None = None,
                 channel_bytes: int = CHANNEL_BYTES) -> None:
        self.module = module
        self.sock = None if host is None else bind_socket(host, port or 0)  # PortInUse
        self.url = None if self.sock is None else url_of(self.sock)
        self._boot, self._hello, self._tokenizer = boot, hello, tokenizer
        self._on_channel = on_channel
        self._on_close = on_close  # told before a channel closes
        self._channel_bytes = channel_bytes
        self.channel: Channel | None = None
        self.proc: subprocess.Popen | None = None
        self.early: list = []  # messages that came before ``ready``: the link's
        self.restarts = 0
        self.given_up = False
        self._checked = 0.0

    def start(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Start the server process and wait until it serves; :class:`ServerFailed` if not."""
        channel = Channel.create(self._channel_bytes)
        fds = channel.child_fds()
        cmd = [sys.executable, "-m", self.module, "--fds", ",".join(map(str, fds))]
        passed = list(fds)
        if self.sock is not None:
            cmd += ["--socket", str(self.sock.fileno())]
            passed.append(self.sock.fileno())
        try:
            self.proc = subprocess.Popen(cmd, pass_fds=passed, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        except OSError as exc:
            channel.close()
            raise ServerFailed(f"cannot start {self.module}: {exc}") from exc
        channel.close_child_fds()
        self.channel = channel
        tensors = {} if self._tokenizer is None else {"tokenizer": self._tokenizer}
        channel.send("boot", self._boot, tensors)
        channel.send("hello", self._hello())
        self._wait_ready(timeout)
        if self._on_channel is not None:
            self._on_channel(channel)

    def _wait_ready(self, timeout: float) -> None:
        assert self.channel is not None and self.proc is not None
        deadline = time.monotonic() + timeout
        self.early = []
        while True:
            for message in self.channel.receive():
                if message.kind == "ready":
                    return
                if message.kind == "failed":
                    self._reap()
                    raise ServerFailed(f"the dashboard's server process failed: "
                                       f"{message.header.get('error')}")
                self.early.append(message)  # for the link (history, a plan)
            left = deadline - time.monotonic()
            if self.proc.poll() is not None or left <= 0:
                self._reap()
                raise ServerFailed("the dashboard's server process exited before serving "
                                   f"(exit code {self.proc.returncode})" if left > 0 else
                                   f"the dashboard's server process did not start in "
                                   f"{timeout:g} s")
            self.channel.wait(min(left, 0.5))

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> bool:
        """Called from ``step()``: True when the server process is there (or was just
        restarted); at most one waitpid per ``CHECK_EVERY_S``."""
        now = time.monotonic()
        if self.given_up or now - self._checked < CHECK_EVERY_S:
            return not self.given_up
        self._checked = now
        if self.alive:
            return True
        code = None if self.proc is None else self.proc.returncode
        self._close_channel()
        if self.restarts >= MAX_RESTARTS:
            self.given_up = True
            logger.error("attnscope: the dashboard's server process exited (code %s) %d times; "
                         "training goes on without the dashboard", code, self.restarts + 1)
            return False
        self.restarts += 1
        logger.warning("attnscope: the dashboard's server process exited (code %s); "
                       "starting it again (%d of %d)", code, self.restarts, MAX_RESTARTS)
        try:
            self.start()
        except ServerFailed as exc:
            logger.error("attnscope: %s; training goes on without the dashboard", exc)
            self.given_up = True
            return False
        return True

    def _close_channel(self) -> None:
        if self.channel is not None:
            if self._on_close is not None:
                self._on_close()
            self.channel.close()
            self.channel = None

    def _reap(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_channel()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Wait for the server process to finish after the run's ``close`` (history written,
        sockets closed); SIGTERM, then SIGKILL, past ``timeout``. Frees the port."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("attnscope: the server process did not stop in %g s", timeout)
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(3.0)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._close_channel()
        if self.sock is not None and self.sock.fileno() >= 0:
            self.sock.close()

    def __del__(self) -> None:  # a dashboard dropped without close(): no orphan, no port
        try:
            if self.proc is not None and self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGTERM)
        except Exception:  # noqa: BLE001, S110 (interpreter shutdown)
            pass
