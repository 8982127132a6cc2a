"""Publishers (``/ws/publish``) cannot hurt viewers, other runs or the server.

Each test reproduces an attack with a hand-written publisher first (docs/security.md).
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

import numpy as np
import pytest
import websockets
from auth_support import log_of
from stream_support import Served, connect, recv_frame, recv_json, run_async, small_encoder

from attnscope import Dashboard
from attnscope.contract.protocol import pack as pack_binary
from attnscope.training.connect import RunRefused
from attnscope.training.run import RunRegistry
from transformer_core.events import EventDispatcher

RUN = "bob/run1"


def announce(run: str = RUN, heads: Any = 2, layers: int = 2, **extra: Any) -> str:
    details = [{"index": i, "name": f"layer{i}", "heads": heads, "role": "self",
                "attention_type": "full"} for i in range(layers)]
    return json.dumps({"type": "announce", "wire": 1, "run": run, "name": run,
                       "host": "test:1", "model": {"layer_details": details}, **extra})


def frame(shape: list[int], heads: list[int], layer: int = 0, step: int = 1,
          kind: str = "attention") -> bytes:
    header = {"kind": kind, "layer": layer, "sample": 0, "heads": heads, "role": "self",
              "time": 1.0, "step": step, "dtype": "float16", "shape": shape, "labels": None,
              "valid": None}
    data = np.full(shape, 0.25, dtype="<f2")
    return pack_binary(header, data.tobytes())


async def publisher(served: Served, text: str) -> tuple[Any, dict]:
    ws = await websockets.connect(served.url.replace("http", "ws") + "/ws/publish",
                                  max_size=None)
    await ws.send(text)
    return ws, json.loads(await asyncio.wait_for(ws.recv(), 5))


async def next_of(ws: Any, kind: str) -> dict:
    """The next JSON message of type ``kind`` from the server. Plans are skipped, and so
    are alerts: the history writer's thread sends a publisher its run's alerts whenever
    its statistics trip a rule (the crafted ones here can), in any order with the rest."""
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), 5))
        if message["type"] == kind:
            return message
        assert message["type"] in ("plan", "alert"), message


async def closed_code(ws: Any) -> int:
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            await asyncio.wait_for(ws.recv(), 5)
    return closed.value.rcvd.code


@pytest.fixture
def served():
    with Served(RunRegistry(), max_publishers=3) as s:
        yield s


def test_a_bad_frame_is_refused_and_viewers_never_see_it(served: Served) -> None:
    async def body() -> None:
        pub, welcome = await publisher(served, announce())
        assert welcome["type"] == "welcome"
        viewer = await connect(served.ws_url)
        await viewer.send(json.dumps({"type": "subscribe", "run": RUN,
                                      "kinds": ["attention"], "layers": [0]}))
        await recv_json(viewer, "subscribed")
        await pub.send(frame([8, 8], [0, 1]))  # shape does not match its heads
        error = await next_of(pub, "error")
        assert error["field"] == "shape", error
        for bad in (frame([2, 4, 4], [0, 0]), frame([2, 4, 4], [0, 1], layer=7),
                    frame([2, 4, 4], [0, 5]), b"\x00", pack_binary({"kind": "attention"}, b""),
                    struct.pack("<I", 20000) + b"[" * 10000 + b"]" * 10000):
            await pub.send(bad)
            await next_of(pub, "error")
        await pub.send(frame([2, 4, 4], [0, 1], step=2))  # a good one still goes through
        header, array = await recv_frame(viewer, "attention", 0)
        assert header["step"] == 2 and array.shape == (2, 4, 4)
        await pub.close()
        # A viewer arriving after the publisher left gets the good frame, not a 1011.
        late = await connect(served.ws_url)
        await late.send(json.dumps({"type": "subscribe", "run": RUN, "kinds": ["attention"]}))
        header, _ = await recv_frame(late, "attention", 0)
        assert header["step"] == 2
        await late.close()
        await viewer.close()

    with log_of("server") as log:
        run_async(body)
    assert "Traceback" not in log.getvalue()


@pytest.mark.parametrize("text, field", [
    (announce(heads=10**7), "model.layer_details.0.heads"),
    (announce(layers=2000), "model.layer_details"),
    (announce(heads="2"), "model.layer_details.0.heads"),
    (announce(config={"x": "y" * 100_000}), "config"),
])
def test_announces_out_of_bounds_are_refused(served: Served, text: str, field: str) -> None:
    async def body() -> tuple[dict, int]:
        ws, answer = await publisher(served, text)
        return answer, await closed_code(ws)

    answer, code = run_async(body)
    assert answer["type"] == "error" and field in answer["message"] and code == 1008
    assert served.http.get("/api/v1/runs").json() == []


def test_publisher_sockets_are_capped(served: Served) -> None:
    async def body() -> int:
        held = [(await publisher(served, announce(run=f"cap/{i}")))[0] for i in range(3)]
        ws = await websockets.connect(served.url.replace("http", "ws") + "/ws/publish")
        code = await closed_code(ws)
        for w in held:
            await w.close()
        return code

    assert run_async(body) == 1013


def test_a_second_publisher_cannot_take_a_run_over(served: Served) -> None:
    async def body() -> None:
        owner, welcome = await publisher(served, announce())
        secret = welcome["secret"]
        thief, answer = await publisher(served, announce() .replace('"test:1"', '"thief:2"'))
        assert answer["type"] == "error" and "belongs to another publisher" in answer["message"]
        assert await closed_code(thief) == 1008
        run = served.http.get(f"/api/v1/runs/{RUN}").json()
        assert run["host"] == "test:1" and run["status"] == "live"
        await owner.close(code=1001)  # a dropped connection: idle, the owner comes back
        await asyncio.sleep(0.2)
        assert served.http.get(f"/api/v1/runs/{RUN}").json()["status"] == "idle"
        thief, answer = await publisher(served, announce(secret="guess"))
        assert answer["type"] == "error"
        await thief.close()
        owner, answer = await publisher(served, announce(secret=secret))
        assert answer["type"] == "welcome"
        await owner.send(json.dumps({"type": "close"}))
        await asyncio.sleep(0.2)
        assert served.http.get(f"/api/v1/runs/{RUN}").json()["status"] == "ended"
        other, answer = await publisher(served, announce())  # an ended id is free again
        assert answer["type"] == "welcome" and answer["secret"] != secret
        await other.close()

    run_async(body)


def test_dashboard_connect_says_when_a_run_is_taken(served: Served) -> None:
    model = small_encoder(EventDispatcher())
    first = Dashboard.connect(model, served.url, run=RUN)
    try:
        with pytest.raises(RunRefused, match="belongs to another publisher"):
            Dashboard.connect(small_encoder(EventDispatcher()), served.url, run=RUN)
        assert first.connected.is_set()
    finally:
        first.close()


@pytest.mark.parametrize("text", ["{not json", "[" * 5000 + "]" * 5000])
def test_malformed_publisher_text_gets_an_error_and_1003(served: Served, text: str) -> None:
    async def body() -> tuple[dict, int]:
        ws, _ = await publisher(served, announce())
        await ws.send(text)
        error = await next_of(ws, "error")
        return error, await closed_code(ws)

    with log_of("server") as log:
        error, code = run_async(body)
    assert error["type"] == "error" and code == 1003
    assert "Traceback" not in log.getvalue()


def test_bad_steps_are_dropped_and_the_run_goes_on(served: Served) -> None:
    async def body() -> None:
        ws, _ = await publisher(served, announce())
        for steps in ([[1, 2]], "x", [[10**30, 1.0, {}, None, None]],
                      [[1, 1.0, {"loss": "NaN?"}, None, None]]):
            await ws.send(json.dumps({"type": "steps", "steps": steps}))
            await next_of(ws, "error")
        await ws.send(json.dumps({"type": "steps", "steps": [[5, 1.0, {"loss": 0.5}, 2, 4]]}))
        await asyncio.sleep(0.2)
        assert served.http.get(f"/api/v1/runs/{RUN}").json()["step"] == 5
        await ws.close()

    run_async(body)


def test_oversized_publisher_text_is_refused_before_parsing(served: Served) -> None:
    async def body() -> tuple[dict, int]:
        big = announce(padding="x" * (5 << 20))  # a 300,000-layer announce weighs ~20 MB
        ws = await websockets.connect(served.url.replace("http", "ws") + "/ws/publish",
                                      max_size=None)
        await ws.send(big)
        error = await next_of(ws, "error")
        return error, await closed_code(ws)

    error, code = run_async(body)
    assert code == 1009 and "over the" in error["message"]


def test_remote_runs_are_capped_oldest_ended_forgotten_first() -> None:
    with Served(RunRegistry(), max_remote_runs=2) as served:
        async def body() -> None:
            a, _ = await publisher(served, announce(run="cap/a"))
            b, _ = await publisher(served, announce(run="cap/b"))
            c, answer = await publisher(served, announce(run="cap/c"))  # both live: refused
            assert answer["type"] == "error" and "ATTNSCOPE_MAX_REMOTE_RUNS" in answer["message"]
            assert answer["retry"] is True and await closed_code(c) == 1013  # try again later
            await a.send(json.dumps({"type": "close"}))
            await asyncio.sleep(0.2)
            c, answer = await publisher(served, announce(run="cap/c"))
            assert answer["type"] == "welcome"
            ids = {r["id"] for r in served.http.get("/api/v1/runs").json()}
            assert ids == {"cap/b", "cap/c"}  # the ended one went
            for ws in (a, b, c):
                await ws.close()

        run_async(body)


def test_a_full_server_is_retried_not_refused_for_good() -> None:
    with Served(RunRegistry(), max_remote_runs=1) as served:
        first = Dashboard.connect(small_encoder(EventDispatcher()), served.url, run="full/a")
        second = Dashboard.connect(small_encoder(EventDispatcher()), served.url,
                                   run="full/b")  # does not raise
        try:
            assert second.refused is None and not second.connected.is_set()
            first.close()  # ended: its slot can be taken
            assert second.connected.wait(20), "the second publisher never got in"
            ids = {r["id"] for r in served.http.get("/api/v1/runs").json()}
            assert ids == {"full/b"}
        finally:
            first.close()
            second.close()


def test_a_capture_that_cannot_be_encoded_is_dropped_not_a_1011() -> None:
    """Defence in depth behind the frame checks: the hub drops what it cannot encode."""
    import torch

    from attnscope.contract.plan import Capture

    registry = RunRegistry()
    with Served(registry) as served:
        async def body() -> None:
            pub, _ = await publisher(served, announce())
            viewer = await connect(served.ws_url)
            await viewer.send(json.dumps({"type": "subscribe", "run": RUN,
                                          "kinds": ["attention"], "layers": [0]}))
            await recv_json(viewer, "subscribed")
            bad = Capture(kind="attention", layer=0, sample=0, heads=(0, 1),
                          data=torch.zeros(8, 8, dtype=torch.float16), role="self", time=1.0)
            registry.get(RUN).deliver(bad, None)  # as if it had passed the checks
            await asyncio.sleep(0.5)
            await viewer.send(json.dumps({"type": "ping"}))
            assert (await recv_json(viewer, "pong"))["type"] == "pong"  # still open
            await pub.send(frame([2, 4, 4], [0, 1], step=3))
            header, _ = await recv_frame(viewer, "attention", 0)
            assert header["step"] == 3
            await viewer.close()
            await pub.close()

        with log_of("attnscope") as log:
            run_async(body)
    assert "dropped an unencodable attention capture" in log.getvalue()
