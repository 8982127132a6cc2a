"""A recurrent run watched over /ws, in process and published remotely: frames gain rows."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch
import websockets
from stream_support import Served, recv_frame, recv_json, run_async

from attnscope import Dashboard
from attnscope.training.run import Run, RunRegistry
from transformer_core.builders import RecurrentEncoderBuilder, TransformerEncoderBuilder
from transformer_core.events import AttentionEvent, EventDispatcher
from transformer_core.masking import TriangularCausalMask

N, L, H, E = 1, 6, 2, 4
SIZES = dict(n_layers=2, n_heads=H, query_dimensions=E, value_dimensions=E,
             feed_forward_dimensions=16, dropout=0.0, attention_dropout=0.0)


def twins():
    torch.manual_seed(0)
    rec = RecurrentEncoderBuilder.from_kwargs(attention_type="full", **SIZES,
                                              event_dispatcher=EventDispatcher()).get().eval()
    batch = TransformerEncoderBuilder.from_kwargs(attention_type="full", **SIZES,
                                                  event_dispatcher=EventDispatcher()).get().eval()
    batch.load_state_dict(rec.state_dict())
    return rec, batch


def expected_layer1(batch, x) -> np.ndarray:
    """Layer 1's causal attention (H, L, L) of the batch model on ``x`` (N = 1)."""
    seen = []
    inner = batch.layers[1].attention.inner_attention
    inner.event_dispatcher.listen(lambda e: isinstance(e, AttentionEvent) and e.source is inner,
                                  seen.append)
    batch(x, attn_mask=TriangularCausalMask(L))
    (event,) = seen
    return event.attention_matrix[0].detach().numpy()


@pytest.mark.parametrize("where", ["local", "remote"])
def test_a_viewer_sees_the_rows_of_the_sequence_so_far(where):
    rec, batch = twins()
    x = torch.randn(N, L, H * E)
    expected = expected_layer1(batch, x)
    registry = RunRegistry()
    with Served(registry) as served:
        if where == "local":
            dash = None
            run = registry.add(Run(rec, run_id="gen"))
            step = run.step
        else:
            dash = Dashboard.connect(rec, served.url, run="gen")
            step = dash.step

        async def watch():
            async with websockets.connect(served.ws_url, max_size=None) as ws:
                await recv_json(ws, "hello")
                await ws.send(json.dumps({"type": "subscribe", "run": "gen",
                                          "kinds": ["attention"], "layers": [1],
                                          "max_fps": 60}))
                await recv_json(ws, "subscribed")
                if dash is not None:  # the plan reaches the publisher after "subscribed"
                    while dash._link.publisher.plan.empty:
                        dash.poll()  # reads what the relay sent (a plan) between steps
                        await asyncio.sleep(0.01)
                shapes, state = [], None
                for t in range(L):
                    with torch.no_grad():
                        _, state = rec(x[:, t], state=state)
                    step(t, tokens=[[f"x{t}"]])
                    header, array = await recv_frame(ws, "attention", layer=1, min_step=t,
                                                     timeout=10)
                    shapes.append(header["shape"])
            return shapes, header, array

        try:
            shapes, header, array = run_async(watch, timeout=60)
        finally:
            if dash is not None:
                dash.close()
    # a frame per step here (the viewer waits for each): one more row each time
    assert shapes == [[H, t + 1, t + 1] for t in range(L)]
    assert header["labels"] == {"queries": [f"x{t}" for t in range(L)],
                                "keys": [f"x{t}" for t in range(L)]}
    np.testing.assert_allclose(np.asarray(array, np.float32), expected, atol=2e-3)
