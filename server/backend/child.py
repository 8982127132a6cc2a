"""The dashboard's server process: ``python -m attnscope.backend.child --fds A,B,C,D --socket S``.

Started by ``Dashboard.start`` in the training process (:mod:`attnscope.training.process`),
with the channel's fds and the listening socket inherited. It reads the ``boot`` and
``hello`` messages, serves the run (:class:`~attnscope.backend.channel_run.ChannelRun`)
with the whole web stack (hub, encoder, history writer, captures store) and feeds it from
the channel on its event loop. It says ``ready`` (or ``failed``) down the channel once.

It lives exactly as long as the training process: when the training side's doorbell
reads EOF (that process is gone, whatever killed it) or its parent process changes, it
shuts down; it ignores the terminal's Ctrl-C (it runs in its own session) and stops
gracefully on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pickle
import socket
import sys
import time
from typing import Any

import torch

from ..contract.channel import Channel, Message

logger = logging.getLogger("attnscope.server")

# The training process sends boot and hello right after starting us.
BOOT_TIMEOUT_S = 30.0
# How often the parent's pid and this run's helper CPU are looked at.
HOUSEKEEPING_S = 1.0


def _first_messages(channel: Channel, count: int) -> list[Message]:
    """The first ``count`` messages from the training process (blocking)."""
    got: list[Message] = []
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    while len(got) < count:
        got.extend(channel.receive())
        if len(got) >= count:
            break
        left = deadline - time.monotonic()
        if left <= 0 or not channel.wait(left):
            raise RuntimeError("the training process sent no boot message")
    return got


def _tokenizer(boot: Message) -> Any:
    """The run's tokenizer (pickled by the training process), as a run uses it."""
    raw = boot.tensors.get("tokenizer")
    if raw is None:
        return None
    from ..core.model_inputs import TextTokenizer

    try:
        return TextTokenizer(pickle.loads(raw.numpy().tobytes()))  # noqa: S301 (our parent's)
    except Exception:  # noqa: BLE001 (labels fall back to the run's symbols)
        logger.warning("the run's tokenizer could not be loaded here; labels use its symbols",
                       exc_info=True)
        return None


async def _serve(channel: Channel, boot: Message, hello: Message, sock: socket.socket) -> None:
    import uvicorn

    from ..core.run_base import RunRegistry
    from ..settings import Settings
    from .app import create_app
    from .channel_run import ChannelRun
    from .serving import uvicorn_config

    settings = Settings.model_validate(boot.header["settings"])
    registry = RunRegistry()
    run = registry.add(ChannelRun(hello.header, channel, _tokenizer(boot)))
    server = uvicorn.Server(uvicorn_config(create_app(settings, registry), settings))
    loop = asyncio.get_running_loop()
    parent = os.getppid()

    def stop(why: str) -> None:
        if not server.should_exit:
            logger.info("attnscope server process stops: %s", why)
        run.gone()
        server.should_exit = True

    def on_bell() -> None:
        if not channel.drain_bell():
            loop.remove_reader(channel.bell_in)
            stop("the training process is gone")
        for message in channel.receive():
            try:
                run.receive(message)
            except (ValueError, TypeError, KeyError, IndexError) as exc:
                logger.warning("run %r: dropped a %s message: %s", run.id, message.kind, exc)
            if message.kind == "close" and not message.header.get("keep_serving"):
                stop("the run ended")

    async def housekeeping() -> None:
        while not server.should_exit:
            await asyncio.sleep(HOUSEKEEPING_S)
            if os.getppid() != parent:
                stop("its parent process changed")
            helper = run.budget.take_helper()
            if helper and not channel.peer_gone:
                run.send("helper_cpu", helper)
            if channel.has_mail:  # steps a loop that stopped left without ringing
                on_bell()

    loop.add_reader(channel.bell_in, on_bell)
    on_bell()  # what arrived before the reader was added
    chores = asyncio.create_task(housekeeping())

    async def announce() -> None:
        while not server.started and not server.should_exit:
            await asyncio.sleep(0.01)
        if server.started:
            run.send("ready", {"pid": os.getpid()})

    ready = asyncio.create_task(announce())
    try:
        await server.serve(sockets=[sock])
    finally:
        chores.cancel()
        ready.cancel()


def torch_threads(cores: int | None = None) -> int:
    """The torch intra-op threads of a process of ours: a quarter of the cores, 1 to 4.

    torch's default is one per core, and each spins a while after every op: beside a
    training process on a machine with few cores, those threads take the cores the
    training uses (on 2 cores, a launch-bound stand-in ran 4 % slower with history on).
    """
    cores = cores if cores is not None else (os.cpu_count() or 1)
    return max(1, min(4, cores // 4))


def run_process(what: str, channel: Channel, serve: Any, log_level: str = "warning") -> int:
    """The main of a process of ours beside a training process: read ``boot`` and
    ``hello``, log as ``attnscope <what>``, ``asyncio.run(serve(channel, boot, hello))``;
    a failure is logged and said to the training process (``failed``). Its exit code."""
    fmt = f"attnscope {what}: %(levelname)s %(name)s: %(message)s"
    torch.set_num_threads(torch_threads())
    try:
        boot, hello = _first_messages(channel, 2)
        level = str(boot.header.get("settings", {}).get("log_level", log_level)).upper()
        logging.basicConfig(level=getattr(logging, level, logging.WARNING), format=fmt)
        asyncio.run(serve(channel, boot, hello))
    except Exception as exc:
        logging.basicConfig(format=fmt)
        logging.getLogger(f"attnscope.{what}").exception("the %s process failed", what)
        if not channel.peer_gone:
            channel.send("failed", {"error": f"{type(exc).__name__}: {exc}"})
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attnscope-server")
    parser.add_argument("--fds", required=True)
    parser.add_argument("--socket", type=int, required=True)
    args = parser.parse_args(argv)
    fds = tuple(int(x) for x in args.fds.split(","))
    channel = Channel.attach(fds, side="server")  # type: ignore[arg-type]
    sock = socket.socket(fileno=args.socket)
    return run_process("server", channel,
                       lambda channel, boot, hello: _serve(channel, boot, hello, sock))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
