"""No publisher can touch another run's data: what publishers send to the history is
checked, isolated and bounded (docs/security.md, "Publishers" and "History quotas").

Each test reproduces one attack with a hand-written publisher against a real server
whose local run ``toy`` is being recorded, and checks what a user would notice: the
other runs' history still there and readable, the bad record answered with an
``error`` naming the field, no 500, no traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
import torch
from auth_support import log_of
from stream_support import Served, Trainer, run_async, small_encoder
from test_hardening_remote import closed_code, next_of, publisher

from attnscope.backend.history.store import HistoryFull, HistoryStore, StatRow
from attnscope.backend.history.writer import HistoryWriter
from attnscope.contract.protocol import pack as pack_binary
from attnscope.core.history_config import HistoryConfig
from attnscope.core.history_items import StoredSnapshot, StoredStats
from attnscope.core.stats import HEAD_STATISTICS
from attnscope.training.run import Run, RunRegistry
from transformer_core.events import EventDispatcher

R = len(HEAD_STATISTICS)


def announce(run: str, layers: int = 2, heads: int = 2, **model: Any) -> str:
    details = [{"index": i, "name": f"layer{i}", "heads": heads, "role": "self"}
               for i in range(layers)]
    return json.dumps({"type": "announce", "wire": 1, "run": run, "name": run,
                       "host": "attacker:1", "records_history": True,
                       "model": {"layer_details": details, **model}})


def session(name: str = "s1", **meta: Any) -> str:
    return json.dumps({"type": "history_session", "session": name, "name": "n",
                       "meta": {"stat_names": list(HEAD_STATISTICS), **meta}})


def stats(session_id: str, steps: list[int], shape: list[int] | None = None,
          **header: Any) -> bytes:
    shape = shape if shape is not None else [2, R, 2]
    rows = [[step, 1.0 + step, {"loss": 0.5}, shape] for step in steps]
    payload = np.full((len(steps), math.prod(shape)), 0.25, "<f4").tobytes()
    return pack_binary({"kind": "history_stats", "session": session_id, "rows": rows,
                        **header}, payload)


def snapshot(session_id: str, step: Any, tensors: dict[str, np.ndarray] | None = None,
             **header: Any) -> bytes:
    if tensors is None:
        tensors = {f"attention.{i}": np.full((1, 2, 8, 8), 0.125, np.float16) for i in (0, 1)}
    body = {"kind": "history_snapshot", "session": session_id, "step": step, "time": 2.0,
            "labels": None, **header}
    raw = json.dumps(body, allow_nan=True).encode()  # a hostile header may hold NaN
    raw += b" " * ((-4 - len(raw)) % 8)
    return len(raw).to_bytes(4, "little") + raw + safetensors.numpy.save(tensors)


@contextlib.contextmanager
def recording_toy(data_dir: Path) -> Iterator[Served]:
    """A server recording its local run ``toy`` (2 layers x 2 heads, a snapshot every
    step, never thinned), with at least 3 snapshots when the block starts."""
    model = small_encoder(EventDispatcher())
    registry = RunRegistry()
    run = registry.add(Run(model, run_id="toy"))
    with Served(registry, data_dir=data_dir, history_every=1, max_overhead=1.0) as served, \
            Trainer(run, model, torch.randn(2, 6, 8), period=0.02):
        deadline = time.monotonic() + 30
        while len(toy_index(served).get("snapshots", [])) < 3:
            assert time.monotonic() < deadline, "the local run recorded no snapshots"
            time.sleep(0.1)
        yield served


@pytest.fixture
def toy(tmp_path) -> Iterator[Served]:
    """A server of its own, for tests that count what the history holds."""
    with recording_toy(tmp_path) as served:
        yield served


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Iterator[Served]:
    """One server for the tests that each use run ids of their own."""
    with recording_toy(tmp_path_factory.mktemp("shared")) as served:
        yield served


def toy_index(served: Served) -> dict:
    response = served.http.get("/api/v1/runs/toy/history")
    return response.json() if response.status_code == 200 else {}


def assert_toy_intact(served: Served, before: dict) -> None:
    """The local run's history: the same session, every snapshot and row kept, readable."""
    served.app.state.history.flush()
    after = served.http.get("/api/v1/runs/toy/history")
    assert after.status_code == 200, after.text
    after = after.json()
    assert after["session"] == before["session"]
    steps = set(after["stats"]["steps"])
    assert set(before["stats"]["steps"]) <= steps
    assert {s["step"] for s in before["snapshots"]} <= {s["step"] for s in after["snapshots"]}
    data = served.http.get("/api/v1/runs/toy/history/data")
    assert data.status_code == 200
    with np.load(io.BytesIO(data.content)) as z:
        # the run trains on: a snapshot may land between the two requests
        assert z["attention"].shape[0] >= len(after["snapshots"])
    assert served.http.get("/api/v1/runs/toy/heads").status_code == 200


# -- C. sessions and remote runs only ever cost their own run's quota --------------------

def test_a_flood_of_sessions_evicts_only_the_flooding_runs_own(toy: Served) -> None:
    before = toy_index(toy)

    async def body() -> None:
        ws, welcome = await publisher(toy, announce("flood/a"))
        assert welcome["type"] == "welcome"
        for i in range(120):  # the store kept 100 sessions in all, and deleted the oldest
            await ws.send(session(f"s{i}"))
            await ws.send(stats(f"s{i}", [i]))
        await ws.send(json.dumps({"type": "close"}))
        await closed_code(ws)

    run_async(body)
    assert_toy_intact(toy, before)
    flood = [s for s in toy.http.get("/api/v1/history").json() if s["run"] == "flood/a"]
    assert len(flood) == 10  # history_max_run_sessions, its newest
    assert {s["meta"]["publisher_session"] for s in flood} == {f"s{i}" for i in range(110, 120)}


def test_a_thousand_remote_runs_cannot_evict_a_local_runs_history(toy: Served) -> None:
    before = toy_index(toy)

    async def one(i: int) -> None:
        ws, welcome = await publisher(toy, announce(f"many/{i}"))
        assert welcome["type"] == "welcome"
        await ws.send(session())
        await ws.send(stats("s1", [1]))
        await ws.send(json.dumps({"type": "close"}))
        await closed_code(ws)

    async def body() -> None:
        for start in range(0, 120, 10):
            await asyncio.gather(*(one(i) for i in range(start, start + 10)))

    run_async(body, timeout=120)
    assert_toy_intact(toy, before)
    remote = {s["run"] for s in toy.http.get("/api/v1/history").json() if s["run"] != "toy"}
    assert len(remote) == 32  # history_max_remote_runs, written most recently
    assert "many/119" in remote and "many/0" not in remote


# -- D. a record that cannot be written fails alone ------------------------------------

def test_a_record_that_fails_to_write_fails_alone(tmp_path) -> None:
    service = HistoryWriter(HistoryStore(tmp_path), HistoryConfig())
    try:
        bad = service.new_session("mallory", "m", {"layers": 1})
        good = service.new_session("alice", "a", {"layers": 1})
        tensors = {"attention.0": np.zeros((1, 1, 2, 2), np.float16)}
        rows = [StatRow(step, 0.0, {"loss": 1.0}, np.zeros((1, 5, 1), np.float32))
                for step in range(3)]
        with log_of("attnscope") as log:
            for i in range(3):  # one batch: the writer wakes 4 times a second
                service.submit(StoredSnapshot(bad, 2**70 + i, 0.0, tensors, None))
            service.submit(StoredStats(good, rows))
            service.submit(StoredSnapshot(good, 5, 0.0, tensors, None))
            assert service.flush()
        assert [r.step for r in service.store.stats(good)] == [0, 1, 2]
        assert [s for s, _ in service.store.snapshots(good)] == [5]
        assert service.failed == 3
        text = log.getvalue()
        assert text.count("could not be written") == 1 and "'mallory'" in text
        assert "Traceback" not in text
    finally:
        service.close()


def test_closing_the_writer_with_records_waiting_writes_them_quietly(tmp_path) -> None:
    service = HistoryWriter(HistoryStore(tmp_path), HistoryConfig())
    session = service.new_session("alice", "a", {"layers": 1})
    rows = [StatRow(1, 0.0, {}, np.zeros((1, 5, 1), np.float32))]
    with log_of("attnscope") as log:
        service.submit(StoredStats(session, rows))
        service.close()  # the writer's last batch: these rows, then the end
    assert "Traceback" not in log.getvalue() and "failed" not in log.getvalue()
    with HistoryStore(tmp_path) as store:
        assert [r.step for r in store.stats(session)] == [1]


def test_a_snapshot_step_beyond_int64_is_refused_and_other_runs_lose_no_row(
        toy: Served) -> None:
    before = toy_index(toy)

    async def body() -> list[dict]:
        ws, _ = await publisher(toy, announce("mallory/int"))
        await ws.send(session())
        errors = []
        for _ in range(12):  # 4 a second, as in the report
            await ws.send(snapshot("s1", 2**70))
            errors.append(await next_of(ws, "error"))
            await asyncio.sleep(0.25)
        await ws.close()
        return errors

    with log_of("attnscope") as log:
        errors = run_async(body)
    assert {e["field"] for e in errors} == {"step"}
    assert_toy_intact(toy, before)
    steps = toy_index(toy)["stats"]["steps"]
    first = steps.index(before["stats"]["steps"][-1])
    assert steps[first:] == list(range(steps[first], steps[-1] + 1))  # not one row lost
    assert "Traceback" not in log.getvalue()


# -- E. metadata is bounded -------------------------------------------------------------

def test_session_metadata_past_the_limit_is_refused(toy: Served) -> None:
    async def body() -> dict:
        ws, _ = await publisher(toy, announce("mallory/meta"))
        await ws.send(session(blob="x" * 3_900_000))  # was stored, 100 times over
        error = await next_of(ws, "error")
        await ws.send(session("s2", note="small"))
        await ws.send(stats("s2", [1]))
        await ws.close()
        return error

    error = run_async(body)
    assert error["field"] == "meta" and "ATTNSCOPE_HISTORY_MAX_META_BYTES" in error["message"]
    toy.app.state.history.flush()
    listing = toy.http.get("/api/v1/history")
    assert listing.status_code == 200 and len(listing.content) < 100_000
    kept = [s for s in listing.json() if s["run"] == "mallory/meta"]
    assert [s["meta"]["note"] for s in kept] == ["small"]


# -- F. statistics and snapshots are checked against the announced layout ---------------

_RUN_IDS = itertools.count()


def _tensor(shape: tuple[int, ...], dtype: Any = np.float16) -> dict[str, np.ndarray]:
    return {"attention.0": np.full(shape, 0.125, dtype)}


@pytest.mark.parametrize("message, field", [
    (stats("s1", [1], shape=[3]), "rows.0.shape"),
    (stats("s1", [1], shape=[7, 5, 99]), "rows.0.shape"),
    (stats("s1", [1], shape=[2, R, 99]), "rows.0.shape"),  # 99 heads, 2 announced
    (stats("s1", [2**70]), "rows.0.step"),
    (pack_binary({"kind": "history_stats", "session": "s1",
                  "rows": [[1, 1.0, {"loss": 0.5}, [2, R, 2]]]}, b"\0" * 12), "payload"),
    (snapshot("s1", 3, _tensor((1, 2, 8, 8), np.float64)), "tensors.attention.0"),
    (snapshot("s1", 3, _tensor((8, 8))), "tensors.attention.0"),
    (snapshot("s1", 3, _tensor((1, 99, 8, 8))), "tensors.attention.0"),
    (snapshot("s1", 3, _tensor((1, 2, 512, 512))), "tensors.attention.0"),  # side > 256
    (snapshot("s1", 3, _tensor((5, 2, 8, 8))), "tensors.attention.0"),  # 5 probe samples
    (snapshot("s1", 3, {"../../x": np.zeros((1, 2, 8, 8), np.float16)}), "tensors"),
    (snapshot("s1", 3, {"attention.7": np.zeros((1, 2, 8, 8), np.float16)}), "tensors"),
    (snapshot("s1", 3, time=float("nan")), "time"),
    (snapshot("s1", 3, labels=["x" * 100]), "labels"),
    (snapshot("nobody", 3), "session"),
    (pack_binary({"kind": "history_snapshot", "session": "s1", "step": 3, "time": 1.0},
                 b"not safetensors"), "payload"),
])
def test_malformed_history_records_are_refused_and_the_run_stays_readable(
        shared: Served, message: bytes, field: str) -> None:
    run = f"mallory/f{next(_RUN_IDS)}"

    async def body() -> dict:
        ws, _ = await publisher(shared, announce(run))
        await ws.send(session())
        await ws.send(stats("s1", [0]))
        await ws.send(snapshot("s1", 0))
        await ws.send(message)
        error = await next_of(ws, "error")
        await ws.close()
        return error

    with log_of("attnscope") as log:
        error = run_async(body)
    assert error["field"] == field, error
    shared.app.state.history.flush()
    for route in ("history", "heads", "history/data", "history/frame?step=10"):
        response = shared.http.get(f"/api/v1/runs/{run}/{route}")
        assert response.status_code == 200, (route, response.text)
    index = shared.http.get(f"/api/v1/runs/{run}/history").json()
    assert index["stats"]["steps"] == [0] and [s["step"] for s in index["snapshots"]] == [0]
    assert "Traceback" not in log.getvalue()


# -- A, B. numbers outside int64 or not finite are 422 naming the field -----------------

@pytest.mark.parametrize("step", [2**63, -(2**63) - 1, 10**24])
def test_heads_at_a_step_beyond_int64_is_422(shared: Served, step: int) -> None:
    response = shared.http.get(f"/api/v1/runs/toy/heads?step={step}")
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["query", "step"]


@pytest.mark.parametrize("body, loc", [
    ('{"run": "toy", "tokens": [[1e999, 2]]}', ["body", "tokens", 0, 0]),
    ('{"run": "toy", "tokens": [[NaN, 2]]}', ["body", "tokens", 0, 0]),
    ('{"run": "toy", "tokens": [[-Infinity, 2]]}', ["body", "tokens", 0, 0]),
    ('{"run": "toy", "features": [[[1e999, 2]]]}', ["body", "features", 0, 0, 0]),
    ('{"run": "toy", "tokens": [[1, 2]], "layers": [1e999]}', ["body", "layers", 0]),
])
def test_non_finite_numbers_in_a_capture_request_are_422(shared: Served, body: str,
                                                          loc: list) -> None:
    response = shared.http.post("/api/v1/captures", content=body,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == loc


def test_an_announced_scalar_history_beyond_int64_or_json_is_refused(shared: Served) -> None:
    for history in ({"steps": [1], "time": [1e999], "values": {}},
                    {"steps": [2**64], "time": [1.0], "values": {}},
                    {"steps": [1], "time": [1.0], "values": {"loss": [float("nan")]}}):
        hello = json.loads(announce(f"mallory/scalars{next(_RUN_IDS)}"))
        text = json.dumps({**hello, "history": history})

        async def body(text: str = text) -> tuple[dict, int]:
            ws, answer = await publisher(shared, text)
            return answer, await closed_code(ws)

        answer, code = run_async(body)
        assert answer["type"] == "error" and answer["message"].startswith("history."), answer
        assert code == 1008


# -- G. a publisher's close is an ordinary event ----------------------------------------

def test_a_publisher_closing_its_run_is_an_ordinary_event(tmp_path) -> None:
    with Served(RunRegistry(), data_dir=tmp_path, max_publishers=200) as served:
        async def one(i: int) -> None:
            ws, _ = await publisher(served, announce(f"bye/{i}"))
            await ws.send(json.dumps({"type": "close"}))
            if i % 2:
                ws.transport.close()  # gone at once, no closing handshake
            else:
                await ws.close()

        async def body() -> None:
            for start in range(0, 200, 50):
                await asyncio.gather(*(one(i) for i in range(start, start + 50)))
            await asyncio.sleep(0.5)

        with log_of("attnscope") as log, log_of("uvicorn.error") as uvicorn_log:
            run_async(body, timeout=60)
        statuses = [r["status"] for r in served.http.get("/api/v1/runs").json()]
    assert statuses == ["ended"] * 200  # was idle for a fifth of them
    text = log.getvalue() + uvicorn_log.getvalue()
    assert "Traceback" not in text and "failed" not in text and "1011" not in text


# -- smaller ones ------------------------------------------------------------------------

def test_a_second_live_connection_of_a_run_waits_until_the_first_is_gone(tmp_path) -> None:
    with Served(RunRegistry(), data_dir=tmp_path) as served:
        async def body() -> None:
            first, welcome = await publisher(served, announce("twice/a"))
            secret = json.loads(announce("twice/a"))
            secret["secret"] = welcome["secret"]
            second, answer = await publisher(served, json.dumps(secret))
            assert answer["type"] == "error" and answer["retry"] is True
            assert "live on another connection" in answer["message"]
            assert await closed_code(second) == 1013
            run = served.http.get("/api/v1/runs/twice/a").json()
            assert run["status"] == "live"
            await first.close(code=1001)  # dropped: idle, and the second gets in
            await asyncio.sleep(0.2)
            assert served.http.get("/api/v1/runs/twice/a").json()["status"] == "idle"
            second, answer = await publisher(served, json.dumps(secret))
            assert answer["type"] == "welcome"
            assert served.http.get("/api/v1/runs/twice/a").json()["status"] == "live"
            await second.close()

        run_async(body)


def test_frames_longer_than_the_announced_max_len_are_refused(tmp_path) -> None:
    from test_hardening_remote import frame

    with Served(RunRegistry(), data_dir=tmp_path) as served:
        async def body() -> None:
            ws, _ = await publisher(served, announce("short/a", max_len=8, seq_len=8))
            await ws.send(frame([2, 16, 16], [0, 1]))
            error = await next_of(ws, "error")
            assert error["field"] == "shape" and "[1, 8]" in error["message"]
            await ws.send(frame([2, 8, 8], [0, 1]))  # within the bound: no answer
            with pytest.raises(TimeoutError):
                await next_of(ws, "error")
            await ws.close()

        run_async(body)


def test_host_headers_are_parsed_strictly(shared: Served) -> None:
    import socket

    port = int(shared.url.rsplit(":", 1)[1])

    def status(head: bytes) -> int:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /api/v1/runs HTTP/1.1\r\n" + head + b"Connection: close\r\n\r\n")
            return int(sock.recv(100).split()[1])

    assert status(f"Host: 127.0.0.1:{port}\r\n".encode()) == 200
    assert status(f"Host: 127.0.0.1:{port}@evil.example\r\n".encode()) == 400
    assert status(b"Host: 127.0.0.1\r\nHost: evil.example\r\n") == 400
    assert status(b"Host: evil.example\r\nHost: 127.0.0.1\r\n") == 400


def test_idle_connections_are_closed_and_capped_per_client(tmp_path) -> None:
    import socket

    with Served(RunRegistry(), data_dir=tmp_path, http_header_timeout_s=1.0,
                http_idle_timeout_s=1.0, max_connections_per_client=20) as served:
        port = int(served.url.rsplit(":", 1)[1])
        held = []
        for _ in range(60):  # half-open: connected, nothing sent (were held for ever)
            sock = socket.socket()
            sock.bind(("127.0.0.2", 0))
            sock.connect(("127.0.0.1", port))
            sock.settimeout(5)
            held.append(sock)
        try:
            health = served.http.get("/api/v1/health")  # another client still gets in
            assert health.status_code == 200
            refused = [s.recv(100) for s in held[20:]]
            assert all(r.startswith(b"HTTP/1.1 503") for r in refused)
            started = time.monotonic()
            assert [s.recv(100) for s in held[:20]] == [b""] * 20  # closed by the server
            assert time.monotonic() - started < 3
            slow = socket.create_connection(("127.0.0.1", port), timeout=5)
            slow.sendall(b"POST /api/v1/captures HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
            assert slow.recv(100) == b""  # a body that stopped arriving
            slow.close()
            again = socket.create_connection(("127.0.0.1", port), timeout=5)
            again.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert again.recv(100).startswith(b"HTTP/1.1 200")
            again.close()
        finally:
            for sock in held:
                sock.close()


# -- quotas in the store -----------------------------------------------------------------

def test_a_runs_quota_evicts_only_its_own_data(tmp_path) -> None:
    tensors = {"attention.0": np.zeros((1, 2, 64, 64), np.float16)}  # ~16 KiB a file
    with HistoryStore(tmp_path, max_run_bytes=100_000) as store:
        local = store.new_session("demo", "demo", {"layers": 1})
        for step in range(3):
            store.add_snapshot(local.id, step, 0.0, tensors)
        kept = store.snapshots(local.id)
        # A publisher under the local run's own id, and another run: each fills its quota.
        same = store.new_session("demo", "demo", {"layers": 1}, origin="remote")
        other = store.new_session("bob", "bob", {"layers": 1}, origin="remote")
        for step in range(40):
            store.add_snapshot(same.id, step, 0.0, tensors)
            store.add_snapshot(other.id, step, 0.0, tensors)
        assert store.snapshots(local.id) == kept
        for session in (same, other):
            steps = [s for s, _ in store.snapshots(session.id)]
            assert 2 <= len(steps) < 10 and steps[-1] == 39  # thinned, its newest kept
        assert store.run_bytes("bob", "remote") <= 100_000
        # Rows count too: a run of statistics only is halved, never another run's.
        rows = [StatRow(step, 0.0, {}, np.zeros((1, 5, 64), np.float32)) for step in range(200)]
        store.add_stats(other.id, rows)
        assert store.run_bytes("bob", "remote") <= 100_000
        assert store.snapshots(local.id) == kept


def test_remote_runs_kept_are_bounded_and_those_recorded_are_never_forgotten(
        tmp_path) -> None:
    with HistoryStore(tmp_path, max_remote_runs=2) as store:
        local = store.new_session("demo", "demo", {})
        a = store.new_session("a", "a", {}, origin="remote")
        store.new_session("b", "b", {}, origin="remote")
        store.new_session("c", "c", {}, origin="remote", keep={"b"})  # a goes
        assert store.session(a.id) is None and store.session(local.id) is not None
        with pytest.raises(HistoryFull, match="ATTNSCOPE_HISTORY_MAX_REMOTE_RUNS"):
            store.new_session("d", "d", {}, origin="remote", keep={"b", "c"})
        assert {s["run"] for s in store.sessions()} == {"demo", "b", "c"}


def test_a_store_written_before_origins_opens_with_its_sessions_sorted(tmp_path) -> None:
    import sqlite3

    db = sqlite3.connect(tmp_path / "index.sqlite3")
    db.executescript("""
        CREATE TABLE sessions (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
            run TEXT NOT NULL, name TEXT, started TEXT NOT NULL, meta TEXT NOT NULL,
            stat_stride INTEGER NOT NULL DEFAULT 1, stat_seen INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE stats (session TEXT NOT NULL, step INTEGER NOT NULL, time REAL NOT NULL,
            scalars TEXT NOT NULL, heads BLOB, PRIMARY KEY (session, step));
        INSERT INTO sessions (id, run, started, meta) VALUES ('l', 'demo', 'x', '{}'),
            ('r', 'bob', 'x', '{"publisher_session": "s1"}');
        INSERT INTO stats VALUES ('r', 1, 0.0, '{}', zeroblob(40));
    """)
    db.commit()
    db.close()
    with HistoryStore(tmp_path) as store:
        assert store.run_bytes("bob", "remote") == 40 + 2 + len('{"publisher_session": "s1"}')
        assert store.run_bytes("demo", "local") == 2
        store.new_session("bob", "bob", {}, origin="remote")
        assert len([s for s in store.sessions() if s["run"] == "bob"]) == 2
