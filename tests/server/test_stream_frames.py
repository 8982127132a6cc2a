"""Frame encoding, pooling, quantisation, head statistics, settings; no server needed."""

from __future__ import annotations

import math
import struct
import time

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from stream_support import small_encoder

from attnscope.backend.frames import encode_binary, encode_stats, pool_factor, quantise
from attnscope.contract.protocol import decode_frame, dequantise
from attnscope.core.stats import MaskInfo, head_stats, valid_key_counts
from attnscope.settings import Settings
from attnscope.training.stream import Capture
from transformer_core.events import EventDispatcher
from transformer_core.masking import FullMask, LengthMask


def capture(data, kind="attention", heads=None, labels=None, **kw):
    heads = heads or tuple(range(data.shape[-3] if kind != "qkv_norms" else data.shape[1]))
    return Capture(kind, 1, 0, heads, data, "self", time.time(), step=7, seq=1,
                   labels=labels, **kw)


def test_frame_layout_is_aligned_and_round_trips():
    data = torch.rand(3, 5, 7)
    frame = encode_binary("r", capture(data.half()), None, 128, "float16")
    (n,) = struct.unpack_from("<I", frame)
    assert (4 + n) % 8 == 0
    header, array = decode_frame(frame)
    assert header["shape"] == [3, 5, 7] and header["dtype"] == "float16"
    assert header["step"] == 7 and header["layer"] == 1 and header["pool"] == 1
    np.testing.assert_array_equal(array, data.half().numpy())


def test_frames_are_encoded_once_per_view():
    cap = capture(torch.rand(2, 4, 4).half())
    first = encode_binary("r", cap, None, 128, "float16")
    assert encode_binary("r", cap, None, 128, "float16") is first
    assert encode_binary("r", cap, (1,), 128, "float16") is not first
    assert len(cap.cache) == 2


def test_pooling_factor_and_uneven_edges():
    assert pool_factor(24, 24, 128) == 1 and pool_factor(300, 10, 128) == 3
    data = torch.arange(2 * 5 * 5, dtype=torch.float32).reshape(2, 5, 5)
    header, array = decode_frame(encode_binary(
        "r", capture(data, kind="qk_logits", labels=(list("abcde"), list("vwxyz"))), None, 4,
        "float16"))
    assert header["pool"] == 2 and header["shape"] == [2, 3, 3]
    assert header["labels"] == {"queries": ["a…b", "c…d", "e"], "keys": ["v…w", "x…y", "z"]}
    assert array[0, 0, 0] == data[0, :2, :2].mean() and array[0, 2, 2] == data[0, 4, 4]


def test_uint8_quantisation_and_non_finite():
    values = np.array([-np.inf, 0.0, 0.5, 2.0, np.nan], dtype=np.float32)
    q, scale, offset = quantise(values)
    assert offset == 0.0 and scale == pytest.approx(2 / 255)
    assert q[0] == 0 and q[4] == 0 and q[3] == 255
    assert abs(offset + scale * q[2] - 0.5) <= scale / 2
    logits = torch.tensor([[[0.0, float("-inf")], [1.0, 3.0]]])
    header, array = decode_frame(encode_binary("r", capture(logits, kind="qk_logits"), None, 128,
                                               "uint8"))
    np.testing.assert_allclose(dequantise(header, array)[0, 1], [1.0, 3.0], atol=header["scale"])


def test_head_stats_for_collapsed_uniform_and_broken_heads():
    L = S = 4
    collapsed = torch.zeros(L, S)
    collapsed[:, 0] = 1.0
    uniform = torch.full((L, S), 1 / S)
    broken = torch.full((L, S), float("nan"))
    stats = head_stats(torch.stack([collapsed, uniform, broken]), None)
    entropy, max_weight, first, nan, inf = stats.tolist()
    assert entropy[:2] == pytest.approx([0.0, 1.0]) and math.isnan(entropy[2])
    assert max_weight[:2] == pytest.approx([1.0, 0.25]) and first[:2] == pytest.approx([1, .25])
    assert nan == [0, 0, 16] and inf == [0, 0, 0]
    message = encode_stats("r", capture(torch.stack([collapsed, uniform, broken]).half(),
                                        kind="head_stats"))
    assert '"entropy":[0.0,1.0,null]' in message and '"nan":[0,0,16]' in message


def test_entropy_is_normalised_by_the_unmasked_keys():
    # causal 3x3: row i sees i + 1 keys, uniformly -> normalised entropy 1 (row 0: 0)
    p = torch.tensor([[1, 0, 0], [.5, .5, 0], [1 / 3, 1 / 3, 1 / 3]])[None]
    masks = MaskInfo(FullMask(torch.ones(3, 3, dtype=torch.bool).tril()), None, "full")
    valid = valid_key_counts(masks, 0, 3, 3)
    assert valid.tolist() == [1, 2, 3]
    assert head_stats(p, valid)[0].item() == pytest.approx(2 / 3)
    lengths = MaskInfo(None, LengthMask(torch.tensor([3, 2])), "linear")
    assert valid_key_counts(lengths, 1, 3, 3).tolist() == [2, 2, 2]


def test_settings_from_environment_and_validation(monkeypatch):
    monkeypatch.delenv("ATTNSCOPE_DATA_DIR", raising=False)  # set by tests/conftest.py
    monkeypatch.setenv("ATTNSCOPE_PORT", "9123")
    monkeypatch.setenv("ATTNSCOPE_MAX_FPS", "5")
    settings = Settings()
    assert settings.port == 9123 and settings.max_fps == 5 and settings.host == "127.0.0.1"
    assert settings.data_dir.name == "attnscope"
    for bad in ({"port": 70000}, {"device": "gpu"}, {"max_side": 4096}, {"colour": 1}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            Settings(**bad)


def slow_pending(calls: list[float], data: torch.Tensor, seconds: float = 0.3):
    """A capture's ``pending`` that takes ``seconds`` (as computing 144 heads does)."""
    def compute() -> torch.Tensor:
        calls.append(time.monotonic())
        time.sleep(seconds)
        return data
    return compute


def test_a_pending_capture_read_by_two_threads_is_computed_once():
    # The hub's encoder and the heads feed may read one head_stats capture at once.
    import threading

    calls: list[float] = []
    data = torch.rand(2, 4, 4).half()
    cap = capture(torch.empty(0), heads=(0, 1), pending=slow_pending(calls, data))
    got: list[torch.Tensor] = []
    errors: list[BaseException] = []

    def read() -> None:
        try:
            got.append(cap.wait())
        except BaseException as exc:  # a reader that finds ``pending`` gone mid-call
            errors.append(exc)

    readers = [threading.Thread(target=read) for _ in range(3)]
    for t in readers:
        t.start()
        time.sleep(0.05)  # the later readers arrive while the first computes
    for t in readers:
        t.join(5)
    assert errors == [] and len(calls) == 1
    assert len(got) == 3 and all(g is data for g in got)


def test_the_hub_computes_frames_off_the_event_loop():
    """While a frame of a big model is computed, the loop keeps serving other sockets."""
    import asyncio

    from attnscope.backend.hub import Hub
    from attnscope.training.run import Run, RunRegistry

    calls: list[float] = []
    data = torch.rand(2, 4, 4).half()
    cap = capture(torch.empty(0), heads=(0, 1), pending=slow_pending(calls, data, 0.5))
    run = Run(small_encoder(EventDispatcher()), run_id="r")
    hub = Hub(RunRegistry(), Settings(port=0))

    async def body() -> tuple[bytes | str | None, int]:
        await hub.start()
        ticks = 0
        stop = False

        async def ticker() -> None:
            nonlocal ticks
            while not stop:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        try:
            [frame] = await hub.encode(run, [cap], None, 128, "float16")
        finally:
            stop = True
            await task
            await hub.stop()
        return frame, ticks

    frame, ticks = asyncio.run(asyncio.wait_for(body(), 10))
    assert len(calls) == 1
    header, array = decode_frame(frame)
    assert header["kind"] == "attention" and array.shape == (2, 4, 4)
    assert ticks >= 10  # the loop ran throughout the 0.5 s computation (about 50 ticks)


def test_the_hub_drops_an_unencodable_capture_with_a_log_line(caplog):
    import asyncio

    from attnscope.backend.hub import Hub
    from attnscope.training.run import Run, RunRegistry

    def broken() -> torch.Tensor:
        raise RuntimeError("shape mismatch")

    cap = capture(torch.empty(0), heads=(0, 1), pending=broken)
    hub = Hub(RunRegistry(), Settings(port=0))

    async def body() -> list[bytes | str | None]:
        await hub.start()
        try:
            run = Run(small_encoder(EventDispatcher()), run_id="r")
            return await hub.encode(run, [cap], None, 128, "float16")
        finally:
            await hub.stop()

    assert asyncio.run(body()) == [None]
    assert "unencodable attention capture" in caplog.text and "shape mismatch" in caplog.text
