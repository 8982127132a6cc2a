"""History recording: cadence, logarithmic thinning, the cap, the probe, persistence."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from stream_support import Wrapped, small_encoder

from attnscope.backend.history.store import HistoryStore, StatRow
from attnscope.backend.history.thinning import thinning_victim
from attnscope.backend.history.writer import HistoryWriter
from attnscope.core.capture import run_capture
from attnscope.core.history_config import HistoryConfig
from attnscope.core.stats import HEAD_STATISTICS
from attnscope.training.run import Run
from transformer_core.events import EventDispatcher


def make_run(run_id: str = "toy") -> tuple[Run, torch.nn.Module]:
    dispatcher = EventDispatcher()
    model = Wrapped(small_encoder(dispatcher, n_layers=2, n_heads=2), d_model=8)
    return Run(model, run_id=run_id), model


def service_on(root, **config) -> HistoryWriter:
    """A service on ``root``; the probe time budget is off unless asked for (exact cadence)."""
    cfg = HistoryConfig(**{"probe_budget": None, **config})
    store = HistoryStore(root, max_snapshots=cfg.max_snapshots, max_bytes=cfg.max_bytes,
                         max_stat_points=cfg.max_stat_points, max_sessions=cfg.max_sessions)
    return HistoryWriter(store, cfg)


def train(run: Run, model: torch.nn.Module, steps, batches=None, on_step=None) -> list:
    """A training loop: a new random batch each step (unless given), a weight nudge, step()."""
    gen = torch.Generator().manual_seed(0)
    seen = []
    for i in steps:
        x = batches[i] if batches is not None else torch.randn(3, 5, 3, generator=gen)
        seen.append(x)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
            model(x)
        run.step(i, loss=1.0 / (i + 1))
        if on_step is not None:
            on_step(i)
    return seen


def test_snapshots_every_k_steps_and_stats_every_step(tmp_path):
    run, model = make_run()
    service = service_on(tmp_path, every=5)
    try:
        service.attach(run)
        train(run, model, range(23))
        assert service.flush()
        session = service.session_of("toy")
        assert [s for s, _ in service.store.snapshots(session)] == [0, 5, 10, 15, 20]
        assert run.batch_size == 3  # the 1-sample probe pass is invisible to the run
        rows = service.store.stats(session)
        assert [r.step for r in rows] == list(range(23))
        assert rows[4].scalars == {"loss": pytest.approx(1 / 5)}
        assert rows[0].heads.shape == (2, len(HEAD_STATISTICS), 2)  # (layers, stats, heads)
        entropy = rows[0].heads[:, 0]
        assert np.all((entropy > 0) & (entropy <= 1))
        # role scores every step; induction scores from the probe snapshot before the row
        induction = HEAD_STATISTICS.index("induction")
        assert np.isnan(rows[0].heads[:, induction]).all()
        assert np.all((rows[1].heads[:, induction] >= 0) & (rows[1].heads[:, induction] <= 1))
        assert np.isfinite(rows[0].heads[:, HEAD_STATISTICS.index("previous_token")]).all()
    finally:
        service.close()


def test_thinning_keeps_recent_dense_and_old_sparse(tmp_path):
    run, model = make_run()
    service = service_on(tmp_path, every=1, max_snapshots=20)
    try:
        service.attach(run)
        train(run, model, range(200))
        assert service.flush()
        steps = [s for s, _ in service.store.snapshots(service.session_of("toy"))]
    finally:
        service.close()
    assert len(steps) == 20
    assert steps[0] == 0 and steps[-1] == 199 and steps[-2] == 198
    gaps = np.diff(steps)
    assert gaps[:5].mean() > 5 * gaps[-5:].mean()  # old: sparse; recent: dense
    # roughly logarithmic: the gaps grow with age, never shrink much
    assert all(a >= 0.5 * b for a, b in zip(gaps[:-1], gaps[1:], strict=True))


def test_probe_passes_are_spaced_out_when_they_cost_too_much(tmp_path):
    run, model = make_run()
    service = service_on(tmp_path, every=2, probe_budget=1e-6)  # no probe is cheap enough
    try:
        service.attach(run)
        train(run, model, range(64))
        assert service.flush()
        steps = [s for s, _ in service.store.snapshots(service.session_of("toy"))]
        assert [r.step for r in service.store.stats(service.session_of("toy"))] == list(range(64))
    finally:
        service.close()
    gaps = np.diff(steps)
    assert len(steps) < 10 and all(s % 2 == 0 for s in steps)  # 32 at the plain cadence
    assert list(gaps) == sorted(gaps) and gaps[-1] >= 8  # 2, 4, 8, ...: doubling


def test_thinning_victim_is_never_an_end():
    steps = [0, 1, 2, 3, 1000]
    assert thinning_victim(steps) in (1, 2, 3)
    with pytest.raises(ValueError, match="at least 3"):
        thinning_victim([0, 1])


def test_snapshots_are_of_the_probe_not_of_later_batches(tmp_path):
    """Every snapshot equals the model run on the first batch's first sample at that step."""
    run, model = make_run()
    service = service_on(tmp_path, every=4)
    expected = {}
    batches = {i: torch.randn(3, 5, 3) for i in range(13)}

    def check(i: int) -> None:
        if i % 4 == 0:
            out = run_capture(model, batches[0][:1], ["attention"])
            expected[i] = {k: v.numpy() for k, v in out.items()}

    try:
        service.attach(run)
        train(run, model, range(13), batches=batches, on_step=check)
        assert service.flush()
        session = service.session_of("toy")
        for step, want in expected.items():
            got = service.store.load_snapshot(session, step)
            for layer in (0, 1):
                a = got[f"attention.{layer}"]
                assert a.shape == (1, 2, 5, 5) and a.dtype == np.float16
                np.testing.assert_allclose(a.astype(np.float32), want[f"attention.{layer}"],
                                           atol=1e-3)
    finally:
        service.close()


def test_a_capture_between_steps_does_not_leak_into_the_next_steps_statistics(tmp_path):
    from attnscope.core.stats import head_stats

    run, model = make_run()
    service = service_on(tmp_path, every=100)
    batches = {i: torch.randn(3, 5, 3) for i in range(6)}
    expected = {}

    def between_steps(i: int) -> None:
        out = run_capture(model, batches[i][:1], ["attention"])  # this step's sample 0
        expected[i] = head_stats(out["attention.1"][0].half(), None).numpy()  # (5, H)
        with torch.no_grad():
            model(torch.full((1, 5, 3), 3.0))  # a capture on another input

    try:
        service.attach(run)
        train(run, model, range(6), batches=batches, on_step=between_steps)
        assert service.flush()
        rows = service.store.stats(service.session_of("toy"))
    finally:
        service.close()
    for row in rows:
        np.testing.assert_allclose(row.heads[1, :5], expected[row.step], atol=2e-3)


def test_cap_on_bytes_is_enforced_keeping_the_newest(tmp_path):
    run, model = make_run()
    one = 2 * (2 * 5 * 5 * 2)  # two layers of (1, 2, 5, 5) float16
    service = service_on(tmp_path, every=1, max_bytes=6 * (one + 400))
    try:
        service.attach(run)
        totals = []
        train(run, model, range(40), on_step=lambda i: totals.append(
            service.flush() and service.store.total_bytes()))
        steps = [s for s, _ in service.store.snapshots(service.session_of("toy"))]
    finally:
        service.close()
    assert max(totals) <= 6 * (one + 400)
    assert 2 <= len(steps) <= 12 and steps[-1] == 39 and steps[0] == 0  # 40 without the cap


def test_other_sessions_give_way_to_the_cap_first(tmp_path):
    store = HistoryStore(tmp_path, max_bytes=10_000)
    try:
        data = {"attention.0": np.zeros((1, 1, 20, 20), np.float16)}  # ~900 bytes a file
        old = store.new_session("old", None, {"layers": 1})
        for step in range(8):
            store.add_snapshot(old.id, step, 0.0, data)
        new = store.new_session("new", None, {"layers": 1})
        for step in range(8):
            store.add_snapshot(new.id, step, 0.0, data)
            assert store.total_bytes() <= 10_000
        assert len(store.snapshots(new.id)) == 8
        assert len(store.snapshots(old.id)) < 8
    finally:
        store.close()


def test_history_survives_a_restart_and_a_restarted_run_gets_a_new_session(tmp_path):
    run, model = make_run()
    service = service_on(tmp_path, every=3)
    service.attach(run)
    train(run, model, range(10))
    assert service.flush()
    first = service.store.sessions()[0]
    service.close()
    (tmp_path / "tmp" / "half-written.tmp").write_bytes(b"x")  # a crash mid-write

    run2, model2 = make_run()  # same run id, new process
    service = service_on(tmp_path, every=3)
    try:
        assert not (tmp_path / "tmp" / "half-written.tmp").exists()
        assert service.session_of("toy") == first["session"]  # not live yet: the stored one
        steps = [s for s, _ in service.store.snapshots(first["session"])]
        assert steps == [0, 3, 6, 9]
        assert [r.step for r in service.store.stats(first["session"])] == list(range(10))
        service.attach(run2)
        train(run2, model2, range(4))
        run2.reset()
        train(run2, model2, range(2))  # started over: a third session
        assert service.flush()
        sessions = service.store.sessions()
        assert len(sessions) == 3 and sessions[-1]["session"] == first["session"]
        assert [s["last_step"] for s in sessions] == [0, 3, 9]
    finally:
        service.close()


def test_stats_are_thinned_by_halving(tmp_path):
    store = HistoryStore(tmp_path, max_stat_points=8)
    try:
        s = store.new_session("toy", None, {"layers": 1})
        for step in range(20):
            store.add_stats(s.id, [StatRow(step, 0.0, {"loss": float(step)}, None)])
        steps = [r.step for r in store.stats(s.id)]
        assert len(steps) <= 8 and steps[0] == 0
        assert steps == sorted(steps) and steps[-1] >= 16
    finally:
        store.close()


def test_a_full_writer_queue_drops_records_instead_of_blocking(tmp_path):
    run, model = make_run()
    one = 2 * (2 * 5 * 5 * 2)  # bytes of one snapshot: 2 layers of (1, 2, 5, 5) float16
    service = service_on(tmp_path, every=1, queue_bytes=3 * one)
    service.store._lock.acquire()  # the writer stalls on its first write
    try:
        service.attach(run)
        train(run, model, range(12))  # must return although nothing can be written
        assert service.dropped >= 12 - 4  # at most 3 snapshots wait (+1 being written)
        # bounded: the cap, or one item alone (larger than the cap) when nothing else waits
        assert service._queued_bytes <= 3 * one or service._queue.qsize() <= 1, (
            service._queued_bytes, service._queue.qsize())
    finally:
        service.store._lock.release()
        service.close()


def test_one_record_larger_than_the_queue_cap_is_taken_when_nothing_waits(tmp_path):
    """A big model's snapshot copies may exceed the cap on their own: taken alone (memory
    bounded by one item), so snapshots are recorded; a second while it waits is dropped."""
    service = service_on(tmp_path, every=1, queue_bytes=100)
    big = types.SimpleNamespace(nbytes=1000)
    service.store._lock.acquire()  # the writer stalls on its first write
    try:
        assert service.submit(big) is True
        assert service.submit(types.SimpleNamespace(nbytes=1000)) is False
        assert service.submit(types.SimpleNamespace(nbytes=10)) is False  # over the cap now
        assert service.dropped == 2
    finally:
        service.store._lock.release()
        service.close()


def test_a_second_process_cannot_open_the_same_history(tmp_path):
    from attnscope.backend.history.store import HistoryLocked

    with HistoryStore(tmp_path), pytest.raises(HistoryLocked, match="in use"):
        HistoryStore(tmp_path)


def test_config_names_the_bad_field():
    with pytest.raises(ValueError, match="history_every"):
        HistoryConfig(every=0).validate()


def test_expensive_probe_passes_are_spaced_as_soon_as_their_cost_is_known(tmp_path):
    """A probe pass costing half a training step (a big model trained at batch 1) would
    alone take 5 % of training time every 10 steps: once the budget has measured a window,
    snapshots are spaced to keep probe passes under PROBE_SHARE of it, and the budget says
    so; cheap probe passes keep the cadence."""
    from attnscope.training.recorder import PROBE_SHARE

    def budgeted(run_id: str) -> Run:
        model = Wrapped(small_encoder(EventDispatcher(), n_layers=2, n_heads=2), d_model=8)
        return Run(model, run_id=run_id, max_overhead=0.03)

    run = budgeted("big")
    service = service_on(tmp_path)  # every 10 steps
    try:
        recorder = service.attach(run)
        budget = run.budget
        recorder._probe_cost = 0.5  # CPU s of the last probe passes
        budget.step_time = 1.0  # s of training per step
        recorder._space_snapshots()
        assert budget.snapshot_stride == 1  # not before the budget has measured a window
        budget.overhead = 0.01
        recorder._space_snapshots()
        # 5 % against 40 % of 3 %: 4.2x, so 8x further apart (every 80 steps)
        assert PROBE_SHARE == 0.4 and budget.snapshot_stride == 8
        assert "snapshots 8x further apart" in budget.text()
        cheap_run = budgeted("cheap")
        cheap = service.attach(cheap_run)
        cheap._probe_cost, cheap_run.budget.step_time, cheap_run.budget.overhead = \
            0.001, 0.01, 0.01  # 1 % of training every 10 steps: under 1.2 %
        cheap._space_snapshots()
        assert cheap_run.budget.snapshot_stride == 1
    finally:
        service.close()
