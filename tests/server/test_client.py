"""attnscope.client.Client and ``attnscope capture`` against a real server."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch
from captures_support import make_app, serve

from attnscope.client import Capture, CaptureAPIError, Client, main


@pytest.fixture
def url(tmp_path: Path) -> Iterator[str]:
    with serve(make_app(tmp_path / "data")) as base:
        yield base


@pytest.fixture
def client(url: str) -> Iterator[Client]:
    with Client(url) as c:
        yield c


def test_capture_returns_numpy_arrays_with_id_and_meta(client: Client) -> None:
    arrays = client.capture("demo", [[1, 2, 3, 4]], kinds=["attention", "qkv"], heads=[0],
                            name="from the client")
    assert isinstance(arrays, Capture) and arrays.meta["name"] == "from the client"
    assert arrays["attention.0"].shape == (1, 1, 4, 4) and arrays["attention.0"].dtype == np.float32
    assert arrays["keys.1"].shape == (1, 4, 1, 4)
    np.testing.assert_allclose(arrays["attention.1"].sum(-1), 1.0, rtol=1e-5)
    assert client.get(arrays.id)["tensors"]["attention.0"]["shape"] == [1, 1, 4, 4]


def test_torch_tensors_and_every_format_agree(client: Client) -> None:
    tensors = client.capture("demo", np.array([3, 1, 2]), as_torch=True)  # one sequence (L,)
    assert isinstance(tensors["attention.0"], torch.Tensor)
    assert tensors["attention.0"].shape == (1, 2, 3, 3)
    for fmt in ("safetensors", "json"):
        other = client.download(tensors.id, format=fmt)
        for name, value in tensors.items():
            np.testing.assert_allclose(other[name], value.numpy(), rtol=1e-6)
    text = client.capture("demo", text="DBC")
    np.testing.assert_array_equal(text["tokens"], [[3, 1, 2]])
    np.testing.assert_allclose(text["attention.1"], tensors["attention.1"].numpy(), rtol=1e-5)


def test_list_get_delete(client: Client) -> None:
    first = client.create("demo", [[1, 2]])
    second = client.create("demo", [[2, 1]])
    assert [x["id"] for x in client.list()] == [second["id"], first["id"]]
    assert [x["id"] for x in client.list(limit=1, offset=1)] == [first["id"]]
    assert client.list(run="other") == []
    client.delete(first["id"])
    assert [x["id"] for x in client.list()] == [second["id"]]
    with pytest.raises(CaptureAPIError, match="HTTP 404: no capture with id") as exc:
        client.get(first["id"])
    assert exc.value.status == 404


def test_refusals_raise_with_the_servers_message(client: Client) -> None:
    with pytest.raises(CaptureAPIError, match=r"body\.tokens\.0\.1: token id 99 .*\[0, 9\]"):
        client.capture("demo", [[1, 99]])
    with pytest.raises(CaptureAPIError, match=r"body\.run: unknown run 'nope'"):
        client.create("nope", [[1]])


def test_save_streams_to_a_file(client: Client, tmp_path: Path) -> None:
    capture_id = client.create("demo", [[1, 2, 3]])["id"]
    npz = client.save(capture_id, tmp_path / "a.npz")
    with np.load(npz) as z:
        assert z["attention.0"].shape == (1, 2, 3, 3)
    st = client.save(capture_id, tmp_path / "a.safetensors")
    assert safetensors.numpy.load_file(st)["tokens"].tolist() == [[1, 2, 3]]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["a.npz", "a.safetensors"]


def test_cli_capture_writes_the_file(url: str, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "a.npz"
    code = main(["--url", url, "--run", "demo", "--tokens", "1 2 3", "--tokens", "4 5 6",
                 "--kinds", "attention,qk_logits", "--layers", "1", "--out", str(out)])
    assert code == 0
    with np.load(out) as z:
        assert set(z.files) == {"attention.1", "qk_logits.1", "tokens"}
        assert z["attention.1"].shape == (2, 2, 3, 3)
    assert "attention.1 (2, 2, 3, 3)" in capsys.readouterr().out


def test_cli_reports_refusals_and_bad_arguments(url: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--url", url, "--run", "demo", "--tokens", "1 77", "--out",
                 str(tmp_path / "a.npz")]) == 1
    assert "token id 77" in capsys.readouterr().out
    assert main(["--url", url, "--run", "demo", "--tokens", "1", "--out",
                 str(tmp_path / "a.csv")]) == 2
    assert "--out must end in one of" in capsys.readouterr().out
    assert not list(tmp_path.glob("a.*"))


def test_cli_says_when_the_server_is_unreachable(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    code = main(["--url", f"http://127.0.0.1:{port}", "--run", "demo", "--tokens", "1",
                 "--out", str(tmp_path / "a.npz")])
    assert code == 1 and "cannot reach" in capsys.readouterr().out
