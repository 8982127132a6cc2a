"""Helpers for the server tests: small models, a trainer thread, a served app, ws clients."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import torch
import torch.nn as nn
import websockets

from attnscope.backend.app import create_app
from attnscope.backend.serving import BackgroundServer
from attnscope.contract.protocol import decode_frame
from attnscope.settings import Settings
from attnscope.training.run import Run, RunRegistry
from transformer_core.builders import TransformerEncoderBuilder
from transformer_core.events import EventDispatcher


def small_encoder(dispatcher: EventDispatcher, n_layers: int = 2, n_heads: int = 2,
                  d_head: int = 4) -> nn.Module:
    """A tiny deterministic encoder (no dropout) talking to ``dispatcher``."""
    torch.manual_seed(0)
    return TransformerEncoderBuilder.from_kwargs(
        n_layers=n_layers, n_heads=n_heads, query_dimensions=d_head, value_dimensions=d_head,
        feed_forward_dimensions=16, dropout=0.0, attention_dropout=0.0,
        event_dispatcher=dispatcher,
    ).get().eval()


class Wrapped(nn.Module):
    """A user's model: the encoder sits inside a bigger module."""

    def __init__(self, encoder: nn.Module, d_model: int) -> None:
        super().__init__()
        self.embed = nn.Linear(3, d_model)
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embed(x))


class Trainer:
    """A training thread: forward ``x``, then ``run.step(i, tokens=...)``, every ``period`` s."""

    def __init__(self, run: Run, model: nn.Module, x: torch.Tensor,
                 tokens: Any = None, period: float = 0.005,
                 fail_at: int | None = None) -> None:
        self.run, self.model, self.x, self.tokens = run, model, x, tokens
        self.period = period
        self.fail_at = fail_at
        self.durations: list[float] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        i = 0
        try:
            while not self._stop.is_set() and self.run.status != "ended":
                t0 = time.perf_counter()
                if self.fail_at is not None and i == self.fail_at:
                    raise RuntimeError(f"boom at step {i}")
                with torch.no_grad():
                    self.model(self.x)
                self.run.step(i, loss=1.0 / (i + 1), tokens=self.tokens)
                self.durations.append(time.perf_counter() - t0)
                i += 1
                time.sleep(self.period)
        except Exception as exc:
            self.run.fail(exc)

    @property
    def steps(self) -> int:
        return len(self.durations)

    def __enter__(self) -> Trainer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.run.close()
        self.thread.join(10)


class Served:
    """An app on a real uvicorn, on a free loopback port."""

    def __init__(self, registry: RunRegistry, **settings: Any) -> None:
        self.settings = Settings(port=0, **settings)
        self.app = create_app(self.settings, registry)
        self.server = BackgroundServer(self.app, self.settings)
        self.url = self.server.url
        self.ws_url = self.url.replace("http://", "ws://") + "/ws"
        self.http = httpx.Client(base_url=self.url, timeout=10)

    @property
    def hub(self):
        return self.app.state.hub

    def __enter__(self) -> Served:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()
        self.server.stop()


def run_async(coro_fn: Callable[[], Any], timeout: float = 30) -> Any:
    """Run an async test body with an overall timeout."""
    return asyncio.run(asyncio.wait_for(coro_fn(), timeout))


async def recv_json(ws: Any, type_: str | None = None, timeout: float = 5) -> dict[str, Any]:
    """The next JSON message (of ``type_`` if given), skipping binary frames."""
    deadline = time.monotonic() + timeout
    while True:
        msg = await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
        if isinstance(msg, str):
            data = json.loads(msg)
            if type_ is None or data["type"] == type_:
                return data


async def recv_frame(ws: Any, kind: str, layer: int | None = None, min_step: int = -1,
                     timeout: float = 5) -> tuple[dict[str, Any], Any]:
    """The next binary frame of ``kind`` (and ``layer``) with step >= ``min_step``."""
    deadline = time.monotonic() + timeout
    while True:
        msg = await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
        if isinstance(msg, bytes):
            header, array = decode_frame(msg)
            if header["kind"] == kind and (layer is None or header["layer"] == layer) \
                    and header["step"] >= min_step:
                return header, array


async def step_until_frame(ws: Any, step: Callable[[int], None], kind: str,
                           tries: int = 200, timeout: float = 0.02) -> tuple[dict[str, Any], Any]:
    """Call ``step(i)`` (a training step) until a frame of ``kind`` arrives; that frame."""
    for i in range(tries):
        step(i)
        try:
            return await recv_frame(ws, kind, timeout=timeout)
        except TimeoutError:
            continue
    raise TimeoutError(f"no {kind} frame in {tries} steps")


async def connect(url: str) -> Any:
    ws = await websockets.connect(url, max_size=None, compression=None)
    hello = json.loads(await ws.recv())
    assert hello["type"] == "hello"
    return ws


def raw_stalled_client(url: str, message: dict[str, Any]) -> socket.socket:
    """A websocket client on a raw socket that sends ``message`` and then never reads."""
    host, port = url.removeprefix("ws://").split("/")[0].split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    response = b""
    while b"\r\n\r\n" not in response:  # wait for the 101, as a real client does
        response += sock.recv(1)
    assert response.startswith(b"HTTP/1.1 101"), response
    payload = json.dumps(message).encode()
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    header = b"\x81" + (bytes([0x80 | len(payload)]) if len(payload) < 126
                        else bytes([0x80 | 126]) + struct.pack(">H", len(payload)))
    sock.sendall(header + mask + masked)
    return sock


def direct_attention(model: nn.Module, dispatcher: EventDispatcher, x: torch.Tensor
                     ) -> list[torch.Tensor]:
    """Every layer's attention matrix (N, H, L, S) for input ``x``, computed directly."""
    from transformer_core.events import AttentionEvent

    seen: list[torch.Tensor] = []

    def keep(event: AttentionEvent) -> None:
        seen.append(event.attention_matrix.detach().clone())

    dispatcher.listen(AttentionEvent, keep)
    try:
        with torch.no_grad():
            model(x)
    finally:
        dispatcher.remove(keep)
    return seen


def rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None
