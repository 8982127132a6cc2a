"""The history of a recurrent run: statistics of each token's attention row, no probe passes."""

from __future__ import annotations

import numpy as np
import torch

from attnscope.backend.history.store import HistoryStore
from attnscope.backend.history.writer import HistoryWriter
from attnscope.core.history_config import HistoryConfig
from attnscope.core.stats import HEAD_STATISTICS
from attnscope.training.run import Run
from transformer_core.builders import RecurrentEncoderBuilder
from transformer_core.events import EventDispatcher
from transformer_core.feature_maps import Favor

N, L, H, E = 2, 8, 2, 4


def model() -> torch.nn.Module:
    """A recurrent encoder with random features, drawn at the first step of a sequence."""
    torch.manual_seed(0)
    return RecurrentEncoderBuilder.from_kwargs(
        attention_type="linear", n_layers=2, n_heads=H, query_dimensions=E, value_dimensions=E,
        feed_forward_dimensions=16, dropout=0.0, feature_map=Favor.factory(n_dims=8),
        event_dispatcher=EventDispatcher(),
    ).get().eval()


def generate(net: torch.nn.Module, run: Run | None) -> torch.Tensor:
    """L steps of ``net`` fed its own output, one run.step per token -> outputs (L, N, d)."""
    torch.manual_seed(1)
    x, state, outs = torch.randn(N, H * E), None, []
    with torch.no_grad():
        for t in range(L):
            x, state = net(x, state=state)
            outs.append(x)
            if run is not None:
                run.step(t, loss=float(t))
    return torch.stack(outs)


def test_a_recurrent_run_records_row_statistics_and_leaves_the_sequence_alone(tmp_path):
    plain = generate(model(), None)
    net = model()
    run = Run(net, run_id="gen")
    cfg = HistoryConfig(every=2, probe_budget=None)
    store = HistoryStore(tmp_path, max_snapshots=cfg.max_snapshots, max_bytes=cfg.max_bytes,
                         max_stat_points=cfg.max_stat_points, max_sessions=cfg.max_sessions)
    service = HistoryWriter(store, cfg)
    try:
        service.attach(run)
        watched = generate(net, run)
        assert service.flush()
        session = service.session_of("gen")
        # No probe pass: it would start a sequence of its own in the middle of the user's
        # (and draw new random features), so the outputs are those of an unwatched run.
        torch.testing.assert_close(watched, plain, atol=0, rtol=0)
        assert service.store.snapshots(session) == []
        rows = service.store.stats(session)
        assert [r.step for r in rows] == list(range(L))
        assert [r.scalars["loss"] for r in rows] == [float(t) for t in range(L)]
        heads = np.stack([r.heads for r in rows])  # (L, layers, stats, H)
        assert heads.shape == (L, 2, len(HEAD_STATISTICS), H)
        entropy = heads[:, :, HEAD_STATISTICS.index("entropy")]
        assert np.isfinite(entropy).all() and (entropy >= 0).all()
        assert (entropy <= 1.01).all()  # normalised (the row is float16: 1 + rounding)
        max_weight = heads[:, :, HEAD_STATISTICS.index("max_weight")]
        assert np.allclose(max_weight[0], 1.0, atol=1e-3)  # the first token has one key
        # one row has no diagonal to score: positional roles are unknown, not made up
        assert np.isnan(heads[:, :, HEAD_STATISTICS.index("previous_token")]).all()
    finally:
        service.close()
