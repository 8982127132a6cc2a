"""Hostile or careless input costs nothing and changes nothing (loopback included).

Each test reproduces one attack on a real server first (docs/security.md lists them).
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import torch
import websockets
from auth_support import TOKEN, log_of
from captures_support import demo_run
from stream_support import Served, Trainer, connect, recv_json, rss_bytes, run_async, small_encoder

from attnscope.backend.guard import host_allow_list
from attnscope.training.run import Run, RunRegistry
from transformer_core.events import EventDispatcher

MiB = 1 << 20


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A served run with a few recorded history snapshots (2 layers x 2 heads, L = S = 6)."""
    dispatcher = EventDispatcher()
    model = small_encoder(dispatcher)
    registry = RunRegistry()
    run = registry.add(Run(model, run_id="toy"))
    data = tmp_path_factory.mktemp("data")
    with Served(registry, data_dir=data, history_every=1, history_probe_budget=None,
                max_response_bytes=64 * 1024) as served, \
            Trainer(run, model, torch.randn(2, 6, 8), period=0.01) as trainer:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            index = served.http.get("/api/v1/runs/toy/history").json()
            if len(index.get("snapshots", [])) >= 3:
                break
            time.sleep(0.1)
        assert trainer.steps >= 3
        yield served


def detail_field(response: httpx.Response) -> str:
    assert response.status_code == 422, response.text
    return response.json()["detail"][0]["loc"][-1]


# -- 1. index lists: duplicates and lengths ------------------------------------------

def test_duplicate_heads_in_history_are_refused_before_anything_is_built(recorded) -> None:
    heads = ",".join(["0"] * 10_000)  # a 20 KB URL that once made a 1.57 GB answer
    before = rss_bytes()
    base = "/api/v1/runs/toy/history"
    for url in (f"{base}/data?", f"{base}/data?format=json&", f"{base}/frame?step=10&",
                f"{base}?"):
        response = recorded.http.get(f"{url}heads={heads}")
        assert detail_field(response) == "heads"
        assert "10000 items, but there are only 2" in response.text
    assert rss_bytes() - before < 50 * MiB
    twice = recorded.http.get("/api/v1/runs/toy/history/data?heads=1,1")
    assert detail_field(twice) == "heads" and "head 1 is listed twice" in twice.text
    assert recorded.http.get("/api/v1/runs/toy/history/data?heads=1,0").status_code == 200


def test_history_sizes_are_checked_before_they_are_built(recorded) -> None:
    """64 KiB limit here: T snapshots x 2 heads x 6 x 6 x 4 bytes passes it past ~230 steps;
    one head of a short range fits, everything does not once enough snapshots exist."""
    ok = recorded.http.get("/api/v1/runs/toy/history/data?heads=0&from=0&to=2")
    assert ok.status_code == 200
    settings = recorded.app.state.settings
    old = settings.max_response_bytes
    settings.max_response_bytes = 1024
    try:
        big = recorded.http.get("/api/v1/runs/toy/history/data")
    finally:
        settings.max_response_bytes = old
    assert detail_field(big) == "heads"
    assert "over this server's limit of 1024 bytes" in big.text


@pytest.mark.parametrize("query", ["data?from=1000000000000000000000000",
                                   "data?to=-1000000000000000000000000",
                                   "frame?step=1000000000000000000000000",
                                   "data?sample=1000000000000000000000000",
                                   "?layer=1000000000000000000000000"])
def test_huge_integers_are_422_not_500(recorded, query: str) -> None:
    response = recorded.http.get(f"/api/v1/runs/toy/history/{query}".replace("/?", "?"))
    assert response.status_code == 422, response.text


def test_duplicate_or_too_many_indices_in_a_subscription_are_errors(recorded) -> None:
    async def body() -> None:
        ws = await connect(recorded.ws_url)
        for field, values in (("heads", [0, 0]), ("layers", [1, 1]), ("heads", [0] * 4000)):
            await ws.send(json.dumps({"type": "subscribe", "run": "toy", field: values}))
            error = await recv_json(ws, "error")
            assert error["field"] == field, error
        await ws.send(json.dumps({"type": "subscribe", "run": "toy", "heads": [1, 0]}))
        assert (await recv_json(ws, "subscribed"))["heads"] == [0, 1]
        await ws.close()

    run_async(body)


# -- 2. malformed websocket input: an error and a documented close, no traceback --------

@pytest.mark.parametrize("text, reason", [("[" * 5000 + "]" * 5000, "nested too deeply"),
                                          ("{not json", "must be JSON")])
def test_malformed_json_gets_an_error_and_1003_not_1011(recorded, text: str,
                                                         reason: str) -> None:
    async def body() -> tuple[dict, int]:
        ws = await connect(recorded.ws_url)
        await ws.send(text)
        error = await recv_json(ws, "error")
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
        return error, closed.value.rcvd.code

    with log_of("server") as log:
        error, code = run_async(body)
    assert code == 1003 and reason in error["message"]
    assert "Traceback" not in log.getvalue()
    assert recorded.http.get("/api/v1/health").status_code == 200


# -- 3. loopback: Host allow-list, Origin and JSON-only on state-changing requests -------

@pytest.fixture(scope="module")
def live():
    registry = RunRegistry()
    run = registry.add(demo_run("demo", ended=False))
    with Served(registry) as served:
        yield served, run
    run.close()


def test_cross_site_simple_request_cannot_pause_training(live) -> None:
    served, run = live
    evil = served.http.post("/api/v1/runs/demo/pause", content=b"x", headers={
        "Content-Type": "text/plain", "Origin": "http://evil.example"})
    assert evil.status_code == 403
    plain = served.http.post("/api/v1/runs/demo/pause", content=b"x",
                             headers={"Content-Type": "text/plain"})
    assert plain.status_code == 415
    form = served.http.post("/api/v1/captures", data={"run": "demo"})
    assert form.status_code == 415
    assert run.status == "live"  # nothing changed
    # The page itself (same origin, no body or JSON) and scripts (no Origin) still work.
    mine = served.http.post("/api/v1/runs/demo/pause", headers={"Origin": served.url})
    assert mine.status_code == 200 and mine.json()["status"] == "paused"
    assert served.http.post("/api/v1/runs/demo/resume").json()["status"] == "live"


def test_dns_rebinding_host_is_refused_on_rest_and_websockets(live) -> None:
    served, _ = live
    evil = {"Host": "evil.example"}
    assert served.http.get("/api/v1/runs", headers=evil).status_code == 400
    assert served.http.get("/", headers=evil).status_code == 400
    port = served.url.rsplit(":", 1)[1]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "LOCALHOST"):
        assert served.http.get("/api/v1/runs", headers={"Host": host}).status_code == 200
    assert served.http.get("/api/v1/health", headers=evil).status_code == 200  # probes

    async def upgrade() -> int:
        try:
            ws = await websockets.connect(served.ws_url, additional_headers=evil)
        except websockets.InvalidStatus as exc:
            return exc.response.status_code
        await ws.close()
        return 101

    assert run_async(upgrade) == 403


def test_allowed_hosts_setting_and_wildcard_binds() -> None:
    with Served(RunRegistry(), allowed_hosts=["dash.example.org"]) as served:
        ok = served.http.get("/api/v1/runs", headers={"Host": "dash.example.org:8000"})
        assert ok.status_code == 200
        assert served.http.get("/api/v1/runs", headers={"Host": "x.example"}).status_code == 400
    assert host_allow_list("0.0.0.0", []) is None  # the token guards a public bind
    assert host_allow_list("10.0.0.5", []) is None
    assert host_allow_list("0.0.0.0", ["a.example"]) == frozenset({"a.example"})
    assert host_allow_list("10.0.0.5", ["a.example"]) == frozenset({"a.example", "10.0.0.5"})
    assert host_allow_list("127.0.0.1", ["*"]) is None
    assert host_allow_list("localhost", []) == frozenset({"localhost"})


# -- 4. captures: duplicate heads, per-capture size and the disk budget ------------------

def test_capture_with_duplicate_heads_is_refused(tmp_path) -> None:
    registry = RunRegistry()
    registry.add(demo_run())
    with Served(registry, data_dir=tmp_path) as served:
        r = served.http.post("/api/v1/captures", json={
            "run": "demo", "tokens": [[1, 2, 3]], "heads": [0] * 1024,
            "kinds": ["attention", "qkv", "qk_logits", "intermediate"]})
        assert r.status_code == 422
        assert r.json()["detail"][0]["loc"] == ["body", "heads"]
        assert served.http.get("/api/v1/captures").json()["total"] == 0


def test_capture_disk_budget_answers_507_before_the_forward_pass(tmp_path) -> None:
    registry = RunRegistry()
    run = registry.add(demo_run())
    forwards = []
    run.model.register_forward_hook(lambda *a: forwards.append(1))
    with Served(registry, data_dir=tmp_path, max_capture_bytes=6000) as served:
        body = {"run": "demo", "tokens": [[1, 2, 3, 4, 5, 6, 7, 8]]}
        statuses = [served.http.post("/api/v1/captures", json=body).status_code
                    for _ in range(6)]
        assert statuses[0] == 201 and statuses[-1] == 507, statuses
        kept = statuses.index(507)
        assert set(statuses[kept:]) == {507}
        assert len(forwards) == kept  # refused before the model ran
        listed = served.http.get("/api/v1/captures").json()
        assert listed["total"] == kept
        assert sum(c["file_bytes"] for c in listed["items"]) <= 6000
        refusal = served.http.post("/api/v1/captures", json=body).json()["detail"]
        assert "ATTNSCOPE_MAX_CAPTURE_BYTES" in refusal
        # Deleting one makes room again.
        served.http.delete(f"/api/v1/captures/{listed['items'][0]['id']}")
        assert served.http.post("/api/v1/captures", json=body).status_code == 201


# -- 7. tokens are printed only when generated ------------------------------------------

def test_user_token_is_never_printed_generated_one_is(monkeypatch, capsys) -> None:
    from attnscope import cli

    monkeypatch.setattr("uvicorn.Server.run", lambda self, sockets: None)
    monkeypatch.setenv("ATTNSCOPE_TOKEN", TOKEN)
    assert cli.main(["serve", "--port", "0"]) == 0
    out = capsys.readouterr().out
    assert TOKEN not in out and "ATTNSCOPE_TOKEN" in out
    monkeypatch.delenv("ATTNSCOPE_TOKEN")
    assert cli.main(["serve", "--port", "0", "--host", "0.0.0.0"]) == 0
    assert "/?token=" in capsys.readouterr().out
