"""Captures of remote runs: ``POST /api/v1/captures`` runs the forward pass in the publisher."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from stream_support import Served, Trainer, small_encoder
from test_remote import wait_for

from attnscope import Dashboard
from attnscope.contract.captures import CHUNK_BYTES, CaptureRequests, answer_capture
from attnscope.contract.protocol import pack
from attnscope.contract.wire import unpack_binary
from attnscope.core.capture import (
    CaptureError,
    CaptureTooLarge,
    CaptureUnavailable,
    run_capture,
)
from attnscope.training.demo import DemoConfig, DemoModel, symbol_labels
from attnscope.training.run import Run, RunRegistry
from transformer_core.events import EventDispatcher

RUN = "bob/remote-captures"
DEMO = DemoConfig(seq_len=8, n_symbols=10, n_layers=2, n_heads=2, d_head=4, feed_forward=16,
                  device="cpu")


@pytest.fixture
def served() -> Iterator[Served]:
    with Served(RunRegistry(), captures_timeout_s=1.0) as served:
        yield served


def _publish(served: Served, model: torch.nn.Module, **kwargs: Any) -> Any:
    dash = Dashboard.connect(model, served.url, run=RUN, **kwargs)
    wait_for(lambda: RUN in served.http.get("/api/v1/runs").text and dash.connections == 1,
             10, "the remote run")
    return dash


def _npz(served: Served, capture_id: str) -> dict[str, np.ndarray]:
    response = served.http.get(f"/api/v1/captures/{capture_id}/data?format=npz")
    assert response.status_code == 200
    with np.load(io.BytesIO(response.content)) as z:
        return {k: z[k] for k in z.files}


def test_a_remote_runs_capture_equals_the_forward_pass_in_its_process(served) -> None:
    symbols = symbol_labels(DEMO.n_symbols)
    model = DemoModel(DEMO)
    dash = _publish(served, model, symbols=symbols)
    tokens = torch.randint(0, DEMO.n_symbols, (3, DEMO.seq_len))
    try:
        with Trainer(dash.run, model, tokens) as trainer:
            wait_for(lambda: trainer.steps > 3, 10, "training steps")
            before = trainer.steps
            text = " ".join(symbols[i] for i in [1, 2, 3, 4, 5, 6, 7, 0])
            response = served.http.post("/api/v1/captures", json={
                "run": RUN, "text": text, "name": "remote",
                "kinds": ["attention", "qk_logits", "qkv", "intermediate"]})
            assert response.status_code == 201, response.text
            after = trainer.steps
        body = response.json()
        assert body["run"] == RUN and body["name"] == "remote"
        assert before - 1 <= body["step"] <= after  # the publisher's step when it ran
        assert body["labels"] == [text.split()]
        got = _npz(served, body["id"])
    finally:
        dash.close()
    expected = run_capture(model, torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]]),
                           ["attention", "qk_logits", "qkv", "intermediate"])
    assert sorted(got) == sorted([*expected, "tokens"])
    for name, tensor in expected.items():
        np.testing.assert_allclose(got[name], tensor.numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    assert got["attention.1"].shape == (1, DEMO.n_heads, DEMO.seq_len, DEMO.seq_len)


def test_a_capture_larger_than_a_publish_message_arrives_whole(served) -> None:
    model = small_encoder(EventDispatcher(), n_heads=2)
    dash = _publish(served, model)
    x = torch.randn(4, 256, 8)  # attention + logits of head 1: 2 x 2 x 4 x 256^2 x 4 B = 4 MiB
    try:
        with Trainer(dash.run, model, x[:1, :8]):
            response = served.http.post("/api/v1/captures", json={
                "run": RUN, "features": x.tolist(), "kinds": ["attention", "qk_logits"],
                "heads": [1]})
            assert response.status_code == 201, response.text
        got = _npz(served, response.json()["id"])
    finally:
        dash.close()
    assert response.json()["tensor_bytes"] > 2 * CHUNK_BYTES
    expected = run_capture(model, x, ["attention", "qk_logits"], heads=[1])
    for name, tensor in expected.items():
        np.testing.assert_allclose(got[name], tensor.numpy(), rtol=1e-5, atol=1e-6)


def test_remote_capture_mistakes_and_a_stalled_or_gone_publisher(served) -> None:
    model = DemoModel(DEMO)
    dash = _publish(served, model)  # no symbols: text cannot be tokenized
    post = lambda **body: served.http.post("/api/v1/captures", json={"run": RUN, **body})  # noqa: E731
    stored = lambda: served.http.get("/api/v1/captures").json()["total"]  # noqa: E731
    stored_before = stored()
    try:
        # Checked on the server, from what the announce said of the model.
        too_long = post(tokens=[[1] * (DEMO.seq_len + 1)])
        assert too_long.status_code == 422 and too_long.json()["detail"][0]["loc"] == [
            "body", "tokens"] and str(DEMO.seq_len) in too_long.json()["detail"][0]["msg"]
        layer = post(tokens=[[1, 2]], layers=[7])
        assert layer.status_code == 422 and layer.json()["detail"][0]["loc"] == ["body", "layers"]
        vocab = post(tokens=[[1, 99]])
        assert vocab.status_code == 422 and "vocabulary" in vocab.json()["detail"][0]["msg"]
        text = post(text="ABC")
        assert text.status_code == 422 and "tokenizer" in text.json()["detail"][0]["msg"]
        # Nobody calls step(): no step boundary within captures_timeout_s.
        stalled = post(tokens=[[1, 2, 3]])
        assert stalled.status_code == 503 and "step boundary" in stalled.json()["detail"]
        # The late answer to the stalled request is dropped; the next request works.
        with Trainer(dash.run, model, torch.zeros(1, 4, dtype=torch.long)):
            assert post(tokens=[[1, 2, 3]]).status_code == 201
    finally:
        dash.close()
    wait_for(lambda: served.http.get(f"/api/v1/runs/{RUN}").json()["status"] == "ended", 10,
             "the run to end")
    ended = post(tokens=[[1, 2, 3]])
    assert ended.status_code == 409 and ended.json()["detail"][0]["loc"] == ["body", "run"]
    assert "not connected" in ended.json()["detail"][0]["msg"]
    assert stored() == stored_before + 1  # only the one that succeeded


# -- the two ends, without a network -------------------------------------------------

def _answered(message: dict[str, Any]) -> list[bytes | str]:
    """What an ended demo run's publisher answers to ``message`` (runs inline)."""
    run = Run(DemoModel(DEMO), run_id="inline")
    run.close()
    return answer_capture(run, {"id": "c1", "max_bytes": 1 << 30, **message})


def _feed(requests: CaptureRequests, answer: list[bytes | str]) -> None:
    for message in answer:
        if isinstance(message, bytes):
            requests.receive_chunk(*unpack_binary(message))
        else:
            requests.receive_error(json.loads(message))


def _request(requests: CaptureRequests, answer_with) -> Any:
    """``requests.request(...)`` whose send answers at once with ``answer_with(id)``."""
    return requests.request(lambda msg: answer_with(msg["id"]), {}, max_bytes=1 << 20,
                            timeout=1.0)


def test_the_server_end_reassembles_chunks_and_maps_errors() -> None:
    requests = CaptureRequests()
    tensors = {"attention.0": torch.rand(2, 3, 4, 4)}
    data = safetensors.torch.save(tensors)

    def chunks(capture_id: str, order=None) -> None:
        parts = [pack({"kind": "capture_result", "id": capture_id, "offset": o,
                              "total": len(data), "step": 12}, data[o : o + 50])
                 for o in range(0, len(data), 50)]
        _feed(requests, parts if order is None else [parts[i] for i in order])

    arrays, step = _request(requests, chunks)
    assert step == 12 and np.array_equal(arrays["attention.0"], tensors["attention.0"].numpy())
    with pytest.raises(CaptureUnavailable, match="out of order"):
        _request(requests, lambda i: chunks(i, order=[1, 0]))
    small = CaptureRequests()
    with pytest.raises(CaptureTooLarge):
        small.request(lambda m: small.receive_chunk(
            {"kind": "capture_result", "id": m["id"], "offset": 0, "total": 3 << 20},
            memoryview(b"x")), {}, max_bytes=1 << 20, timeout=1.0)
    for kind, exc in [("capture", CaptureError), ("input", ValueError),
                      ("timeout", TimeoutError), ("failed", CaptureUnavailable)]:
        with pytest.raises(exc, match="why"):
            _request(requests, lambda i, k=kind: requests.receive_error(
                {"id": i, "error": {"kind": k, "field": "heads", "message": "why"}}))
    with pytest.raises(CaptureUnavailable, match="went away"):
        _request(requests, lambda i: requests.fail_all("went away"))


def test_the_publisher_end_answers_with_chunks_or_a_field_error() -> None:
    answer = _answered({"input": {"tokens": [[1, 2, 3]]}, "kinds": ["attention"],
                        "layers": None, "heads": [1]})
    assert all(isinstance(m, bytes) for m in answer)
    header, _ = unpack_binary(answer[0])
    assert header["kind"] == "capture_result" and header["id"] == "c1"
    bad_head = _answered({"input": {"tokens": [[1, 2, 3]]}, "kinds": ["attention"],
                          "layers": None, "heads": [5]})
    assert len(bad_head) == 1 and '"field": "heads"' in bad_head[0]
    too_big = _answered({"input": {"tokens": [[1, 2, 3]]}, "kinds": ["attention"],
                         "layers": None, "heads": None, "max_bytes": 16})
    assert '"kind": "capture"' in too_big[0] and "limit of 16 bytes" in too_big[0]
