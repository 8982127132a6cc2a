"""The captures REST API over a real uvicorn: every endpoint and every refusal."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import safetensors.numpy
import torch
from captures_support import demo_run, make_app, serve

from attnscope.backend.captures.requests import CaptureLimits
from attnscope.training.run import Run
from transformer_core.builders import TransformerEncoderBuilder
from transformer_core.events import EventDispatcher

API = "/api/v1/captures"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def client(tmp_path: Path) -> Iterator[httpx.Client]:
    with serve(make_app(tmp_path)) as url, httpx.Client(base_url=url, timeout=60) as c:
        yield c


def limited_client(tmp_path: Path, runs: list[Run] | None = None, **limits) -> httpx.Client:
    return serve(make_app(tmp_path, runs, CaptureLimits(**limits)))


def post(c: httpx.Client, **body) -> httpx.Response:
    return c.post(API, json={"run": "demo", **body})


def error_at(response: httpx.Response, status: int = 422) -> tuple[list, str]:
    """(loc, msg) of the first error; asserts the status."""
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    return detail[0]["loc"], detail[0]["msg"]


# -- the happy path ---------------------------------------------------------------


def test_create_returns_shapes_sizes_and_urls(client: httpx.Client) -> None:
    r = post(client, tokens=[[1, 2, 3], [4, 5, 6]], kinds=["attention", "qkv"], heads=[1],
             name="first capture")
    assert r.status_code == 201, r.text
    body = r.json()
    assert r.headers["location"] == f"{API}/{body['id']}"
    assert body["name"] == "first capture" and body["run"] == "demo"
    assert body["tensors"]["attention.1"] == {"shape": [2, 1, 3, 3], "dtype": "float32"}
    assert body["tensors"]["queries.0"] == {"shape": [2, 3, 1, 4], "dtype": "float32"}
    assert body["tensors"]["tokens"] == {"shape": [2, 3], "dtype": "int64"}
    assert body["layers"] == [0, 1] and body["heads"] == [1]
    assert body["input"] == {"kind": "tokens", "shape": [2, 3]}
    assert body["labels"] == [["B", "C", "D"], ["E", "F", "G"]]  # the run's symbols
    assert body["tensor_bytes"] == 2 * (2 * 9 * 4 + 3 * 2 * 3 * 4 * 4) + 6 * 8
    assert body["file_bytes"] > body["tensor_bytes"]
    assert body["urls"]["npz"] == f"{API}/{body['id']}/data?format=npz"
    assert client.get(body["urls"]["metadata"]).json() == body


def test_downloads_agree_in_every_format(client: httpx.Client) -> None:
    body = post(client, text="ABCA", kinds=["attention", "intermediate"], name="my run/1").json()
    npz = client.get(body["urls"]["npz"])
    assert npz.headers["content-disposition"] == 'attachment; filename="my_run_1.npz"'
    assert int(npz.headers["content-length"]) == len(npz.content)
    with np.load(io.BytesIO(npz.content)) as z:
        from_npz = {k: z[k] for k in z.files}
    from_st = safetensors.numpy.load(client.get(body["urls"]["safetensors"]).content)
    from_json = client.get(body["urls"]["json"]).json()
    assert set(from_npz) == set(from_st) == set(from_json["tensors"]) == set(body["tensors"])
    for name, array in from_npz.items():
        np.testing.assert_array_equal(array, from_st[name])
        np.testing.assert_allclose(np.array(from_json["tensors"][name]["data"]), array)
        assert list(array.shape) == body["tensors"][name]["shape"]
    np.testing.assert_array_equal(from_npz["tokens"], [[0, 1, 2, 0]])
    np.testing.assert_allclose(from_npz["attention.0"].sum(-1), 1.0, rtol=1e-5)


def test_list_newest_first_filter_and_pages(tmp_path: Path) -> None:
    runs = [demo_run("demo"), demo_run("other")]
    with limited_client(tmp_path, runs) as url, httpx.Client(base_url=url) as c:
        ids = [post(c, tokens=[[i]], run=run).json()["id"]
               for i, run in enumerate(["demo", "other", "demo"])]
        page = c.get(API).json()
        assert [x["id"] for x in page["items"]] == ids[::-1] and page["total"] == 3
        demo = c.get(API, params={"run": "demo"}).json()
        assert [x["id"] for x in demo["items"]] == [ids[2], ids[0]] and demo["total"] == 2
        second = c.get(API, params={"limit": 1, "offset": 1}).json()
        assert [x["id"] for x in second["items"]] == [ids[1]] and second["total"] == 3
        assert c.get(API, params={"run": "nobody"}).json() == {
            "items": [], "total": 0, "limit": 50, "offset": 0}


def test_delete_then_everything_is_404(client: httpx.Client) -> None:
    capture_id = post(client, tokens=[[1, 2]]).json()["id"]
    assert client.delete(f"{API}/{capture_id}").status_code == 204
    for response in (client.get(f"{API}/{capture_id}"), client.delete(f"{API}/{capture_id}"),
                     client.get(f"{API}/{capture_id}/data")):
        assert response.status_code == 404
        assert capture_id in response.json()["detail"]
    assert client.get(API).json()["total"] == 0


def test_user_labels_and_text_batches(client: httpx.Client) -> None:
    body = post(client, text=["ABC", "CBA"], labels=["x", "y", "z"]).json()
    assert body["labels"] == [["x", "y", "z"], ["x", "y", "z"]]
    assert body["input"] == {"kind": "text", "shape": [2, 3]}
    spaced = post(client, text="A B C", labels=[["1", "2", "3"]]).json()
    assert spaced["labels"] == [["1", "2", "3"]] and spaced["input"]["shape"] == [1, 3]


def test_features_for_a_model_without_embedding(tmp_path: Path) -> None:
    encoder = TransformerEncoderBuilder.from_kwargs(
        n_layers=1, n_heads=2, query_dimensions=2, value_dimensions=2,
        feed_forward_dimensions=8, event_dispatcher=EventDispatcher()).get()
    run = Run(encoder, run_id="bare")
    run.close()
    with limited_client(tmp_path, [run]) as url, httpx.Client(base_url=url) as c:
        ok = c.post(API, json={"run": "bare", "features": [[[0.1, 0.2, 0.3, 0.4]] * 3]})
        assert ok.status_code == 201, ok.text
        assert ok.json()["tensors"]["attention.0"]["shape"] == [1, 2, 3, 3]
        loc, msg = error_at(c.post(API, json={"run": "bare", "tokens": [[1, 2]]}))
        assert loc == ["body", "tokens"] and "does not read token ids" in msg
        loc, msg = error_at(c.post(API, json={"run": "bare", "features": [[[0.1, 0.2]]]}))
        assert loc == ["body", "features", 0, 0] and "d_model is 4" in msg


def test_json_download_refused_past_its_limit(tmp_path: Path) -> None:
    with limited_client(tmp_path, max_json_bytes=100) as url, httpx.Client(base_url=url) as c:
        body = post(c, tokens=[[1, 2, 3]]).json()
        loc, msg = error_at(c.get(body["urls"]["json"]))
        assert loc == ["query", "format"] and "limited to captures of 100" in msg
        assert "format=npz" in msg
        assert c.get(body["urls"]["npz"]).status_code == 200


# -- a live run: the capture happens between steps, in the training thread -------------


def test_capture_on_a_live_run_runs_between_steps_in_the_training_thread(tmp_path: Path) -> None:
    run = demo_run(ended=False)
    model = run.model
    forwards: list[tuple[str, bool]] = []
    model.register_forward_pre_hook(
        lambda m, args: forwards.append((threading.current_thread().name, m.training)))
    stop = threading.Event()

    def train() -> None:
        step = 0
        while not stop.is_set():
            model.train()
            model(torch.randint(10, (2, 8)))
            run.step(step)
            step += 1

    trainer = threading.Thread(target=train, name="trainer", daemon=True)
    trainer.start()
    try:
        with limited_client(tmp_path, [run]) as url, httpx.Client(base_url=url) as c:
            r = post(c, tokens=[[1, 2, 3]])
            assert r.status_code == 201, r.text
            assert r.json()["step"] is not None
    finally:
        stop.set()
        trainer.join(10)
    eval_forwards = [f for f in forwards if not f[1]]
    assert eval_forwards == [("trainer", False)]  # exactly one, in the training thread
    assert all(m.training for m in model.modules())


def test_a_run_that_never_reaches_a_step_gives_503(tmp_path: Path) -> None:
    run = demo_run(ended=False)  # live, but nobody calls step()
    with limited_client(tmp_path, [run], timeout_s=0.3) as url, httpx.Client(base_url=url) as c:
        r = post(c, tokens=[[1, 2]])
        assert r.status_code == 503 and "step boundary" in r.json()["detail"]
        assert c.get(API).json()["total"] == 0
    run.close()


# -- refusals: 4xx naming the field and the limit, never 500 ---------------------------


@pytest.mark.parametrize(("body", "loc", "words"), [
    ({"tokens": [[1, 10]]}, ["body", "tokens", 0, 1], "[0, 9]"),
    ({"tokens": [[-1]]}, ["body", "tokens", 0, 0], "greater than or equal to 0"),
    ({"tokens": []}, ["body", "tokens"], "empty input"),
    ({"tokens": [[]]}, ["body", "tokens", 0], "empty sequence"),
    ({"tokens": [[1, 2], [3]]}, ["body", "tokens", 1], "one length"),
    ({"tokens": [[1] * 9]}, ["body", "tokens"], "limit of 8 positions"),
    ({"tokens": [[1]] * 3}, ["body", "tokens"], "limit of 2 sequences"),
    ({"run": "nope", "tokens": [[1]]}, ["body", "run"], "known runs: demo"),
    ({"tokens": [[1]], "kinds": ["pictures"]}, ["body", "kinds", 0], "'attention'"),
    ({"tokens": [[1]], "kinds": []}, ["body", "kinds"], "at least 1"),
    ({"tokens": [[1]], "layers": [2]}, ["body", "layers"], "2 layers (0-1)"),
    ({"tokens": [[1]], "heads": [0, 2]}, ["body", "heads"], "2 heads (0-1)"),
    ({"tokens": [[1]], "heads": [], "kinds": ["qkv"]}, ["body", "heads"], "at least 1"),
    ({"tokens": [[1]], "layers": []}, ["body", "layers"], "at least 1"),
    ({"tokens": [[1]], "text": "AB"}, ["body"], "exactly one input"),
    ({}, ["body"], "exactly one input"),
    ({"text": "AXB"}, ["body", "text"], "unknown symbol 'X'"),
    ({"text": ["AB", "ZZ"]}, ["body", "text", 1], "unknown symbol"),
    ({"features": [[[0.5] * 8]]}, ["body", "features"], "reads token ids"),
    ({"tokens": [[1, 2]], "labels": ["a"]}, ["body", "labels"], "1 labels for 2 positions"),
    ({"tokens": [[1, 2]], "extra": 1}, ["body", "extra"], "Extra inputs"),
    ({"tokens": [[1, 2, 3, 4, 5, 6, 7, 8]] * 2, "kinds": ["attention", "qkv", "qk_logits"]},
     ["body", "tokens"], "limit of 1000"),
])
def test_bad_input_names_the_field_and_the_limit(tmp_path: Path, body: dict, loc: list,
                                                  words: str) -> None:
    limits = {"max_batch": 2, "max_capture_bytes": 1000}
    with limited_client(tmp_path, **limits) as url, httpx.Client(base_url=url) as c:
        got_loc, msg = error_at(c.post(API, json={"run": "demo", **body}))
        assert got_loc == loc
        assert words in msg
        assert c.get(API).json()["total"] == 0


def test_text_needs_a_run_with_symbols(tmp_path: Path) -> None:
    run = demo_run("plain")
    run.symbols = None
    with limited_client(tmp_path, [run]) as url, httpx.Client(base_url=url) as c:
        loc, msg = error_at(c.post(API, json={"run": "plain", "text": "AB"}))
        assert loc == ["body", "text"] and "no tokenizer" in msg


def test_bodies_over_the_cap_get_413_even_without_content_length(tmp_path: Path) -> None:
    with limited_client(tmp_path, max_body_bytes=2000) as url, httpx.Client(base_url=url) as c:
        big = json.dumps({"run": "demo", "tokens": [[1] * 8] * 200}).encode()
        r = c.post(API, content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "limit of 2000 bytes" in r.json()["detail"]

        def chunks() -> Iterator[bytes]:
            for i in range(0, len(big), 500):
                yield big[i:i + 500]

        chunked = c.post(API, content=chunks(), headers={"content-type": "application/json"})
        assert "content-length" not in chunked.request.headers
        assert chunked.status_code == 413
        assert post(c, tokens=[[1, 2]]).status_code == 201  # the server is fine


@pytest.mark.parametrize("raw", [b"{", b"[]", b'"run"', b"null", b"\xff\xfe", b""])
def test_malformed_bodies_are_422(client: httpx.Client, raw: bytes) -> None:
    r = client.post(API, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text


def test_bad_queries_are_422_unknown_ids_404(client: httpx.Client) -> None:
    assert client.get(API, params={"limit": 0}).status_code == 422
    assert client.get(API, params={"offset": -1}).status_code == 422
    capture_id = post(client, tokens=[[1]]).json()["id"]
    loc, _ = error_at(client.get(f"{API}/{capture_id}/data", params={"format": "hdf5"}))
    assert loc == ["query", "format"]
    assert client.get(f"{API}/{'x' * 500}/data").status_code == 404


# -- persistence and consistency ------------------------------------------------------


def test_captures_survive_a_restart(tmp_path: Path) -> None:
    with limited_client(tmp_path) as url, httpx.Client(base_url=url) as c:
        first = post(c, tokens=[[1, 2, 3]], name="keep").json()
        before = c.get(first["urls"]["safetensors"]).content
    with limited_client(tmp_path) as url, httpx.Client(base_url=url) as c:
        listed = c.get(API).json()["items"]
        assert [x["id"] for x in listed] == [first["id"]]
        assert listed[0] == first
        assert c.get(first["urls"]["safetensors"]).content == before


def test_concurrent_clients_leave_index_and_files_consistent(tmp_path: Path) -> None:
    errors: list[str] = []
    with limited_client(tmp_path) as url:
        def worker(seed: int) -> None:
            with httpx.Client(base_url=url, timeout=60) as c:
                for i in range(8):
                    r = post(c, tokens=[[seed, i, 1]])
                    if r.status_code != 201:
                        errors.append(r.text)
                        continue
                    capture_id = r.json()["id"]
                    if i % 2:
                        status = c.delete(f"{API}/{capture_id}").status_code
                        if status != 204:
                            errors.append(f"delete {status}")
                    for item in c.get(API, params={"limit": 3}).json()["items"]:
                        got = c.get(item["urls"]["npz"])  # may race with its deletion
                        if got.status_code not in (200, 404):
                            errors.append(f"download {got.status_code}")

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors
        with httpx.Client(base_url=url) as c:
            page = c.get(API, params={"limit": 500}).json()
            assert page["total"] == 16
            for item in page["items"]:
                assert c.get(item["urls"]["safetensors"]).status_code == 200
    files = {p.name for p in (tmp_path / "captures" / "files").iterdir()}
    assert files == {f"{x['id']}.safetensors" for x in page["items"]}


SERVER = """
import sys
from pathlib import Path

import uvicorn
from captures_support import BIG, demo_run, make_app

app = make_app(Path(sys.argv[1]), [demo_run(config=BIG)])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def start_server(data_dir: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "server")])}
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(data_dir), str(port)], cwd=ROOT,
                            env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}{API}", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    proc.wait(10)
    raise RuntimeError("server subprocess did not start")


@pytest.mark.slow
def test_sigkill_during_capture_writes_then_restart(tmp_path: Path) -> None:
    """Kill -9 the server while 3 clients write; after a restart every listed capture
    downloads whole, every acknowledged (201) capture is listed, no temporary file is left."""
    proc, url = start_server(tmp_path)
    acknowledged: list[str] = []
    stop = threading.Event()

    def writer(seed: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            for i in range(200):
                if stop.is_set():
                    return
                try:
                    r = c.post(API, json={"run": "demo", "tokens": [[(seed + i) % 10] * 64] * 8,
                                          "kinds": ["attention", "qk_logits", "qkv"]})
                except httpx.TransportError:
                    return  # the server is gone
                if r.status_code == 201:
                    acknowledged.append(r.json()["id"])

    threads = [threading.Thread(target=writer, args=(s,)) for s in range(3)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(acknowledged) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        stop.set()
        proc.kill()
        proc.wait(10)
        for t in threads:
            t.join(30)
    assert len(acknowledged) >= 6
    proc, url = start_server(tmp_path)
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            items = c.get(API, params={"limit": 500}).json()["items"]
            assert set(acknowledged) <= {x["id"] for x in items}
            for item in items:
                with np.load(io.BytesIO(c.get(item["urls"]["npz"]).content)) as z:
                    assert z["attention.0"].shape == (8, 4, 64, 64)
                    assert set(z.files) == set(item["tensors"])
    finally:
        proc.terminate()
        proc.wait(30)
    assert list((tmp_path / "captures" / "tmp").iterdir()) == []
    files = {p.name for p in (tmp_path / "captures" / "files").iterdir()}
    assert files == {f"{x['id']}.safetensors" for x in items}
