"""The cost budget's controller (attnscope.training.budget) with a fake clock: what it measures,
what it thins and in which order, how it recovers, and that it does not flap."""

from __future__ import annotations

import threading

import pytest

from attnscope.training.budget import Budget, FakeClock, overhead_from_env

STEP_S = 0.100  # a training step of the simulated loop


def simulate(budget: Budget, clock: FakeClock, steps: int, stats: float = 0.0,
             snapshots: float = 0.0, stream: float = 0.0, helper: float = 0.0,
             step_s: float = STEP_S, hidden: float = 0.0) -> list[dict[str, int]]:
    """Run ``steps`` training steps whose dashboard work costs, per step and unthinned,
    ``stats``, ``snapshots`` and ``stream`` seconds in the training thread (half of it
    in event handlers during the step, half in the step hooks) plus ``helper`` seconds of
    helper-thread CPU for statistics; each thinned as the budget says. ``hidden``: seconds
    the statistics slow each step by that no CPU accounting sees (a thread holding the GIL,
    kernels on a device), thinned with them. The levels after every step. While the budget
    measures the slowdown (``budget.off``) nothing is spent."""
    seen = []
    for _ in range(steps):
        on = 0.0 if budget.off else 1.0
        costs = {"stats": on * stats / budget.stats_every,
                 "snapshots": on * snapshots / budget.snapshot_stride,
                 "stream": on * stream / budget.stream_factor / (budget.levels["views"] + 1)}
        for name, cost in costs.items():  # handlers, inside the training step
            budget.spend(name, cost / 2)
        clock.advance(step_s + sum(costs.values()) / 2 + on * hidden / budget.stats_every)
        budget.step_begin()
        for name, cost in costs.items():  # step hooks
            budget.spend(name, cost / 2)
        clock.advance(sum(costs.values()) / 2)
        budget.spend_helper("stats", on * helper / budget.stats_every)
        budget.step_end()
        seen.append(dict(budget.levels))
    return seen


def changes(levels: list[dict[str, int]]) -> int:
    return sum(a != b for a, b in zip(levels, levels[1:], strict=False))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_overhead_is_dashboard_time_over_training_time(clock: FakeClock) -> None:
    budget = Budget(None, clock=clock, window_s=1.0)
    simulate(budget, clock, 30, stats=0.002, stream=0.003, helper=0.001)
    assert budget.overhead == pytest.approx(0.06, rel=1e-6)  # 6 ms per 100 ms step
    assert budget.costs["stats"] == pytest.approx(0.03, rel=1e-6)
    assert budget.costs["stream"] == pytest.approx(0.03, rel=1e-6)
    assert budget.status()["overhead_total"] == pytest.approx(0.06, rel=1e-6)
    assert budget.levels == {"stats": 0, "snapshots": 0, "stream": 0, "views": 0}
    assert budget.text() == "dashboard at 6 % of training time (no budget)"


def test_pauses_and_jobs_between_steps_are_not_training_time(clock: FakeClock) -> None:
    budget = Budget(0.03, clock=clock, window_s=1.0)
    for _ in range(30):
        budget.spend("stream", 0.001)
        clock.advance(STEP_S + 0.001)
        budget.step_begin()
        clock.advance(5.0)  # paused from the page, inside step()
        budget.step_end()
    assert budget.overhead == pytest.approx(0.01, rel=1e-6)
    assert budget.thinned() == []


def test_over_budget_thins_in_the_documented_order(clock: FakeClock) -> None:
    budget = Budget(0.03, clock=clock, window_s=1.0)
    # Every part costs 10 %: statistics are thinned first, then snapshots, then the stream.
    levels = simulate(budget, clock, 400, stats=0.010, snapshots=0.010, stream=0.010)
    first = [next(k for k in lv if lv[k] != before[k])
             for before, lv in zip(levels, levels[1:], strict=False) if lv != before]
    order = list(dict.fromkeys(first))
    assert order[:3] == ["stats", "snapshots", "stream"]
    assert budget.overhead <= 0.03
    assert budget.levels["stats"] >= 2 and budget.levels["snapshots"] >= 1
    assert "stats every" in budget.text() and "to stay under 3 %" in budget.text()


def test_only_parts_that_cost_are_thinned(clock: FakeClock) -> None:
    budget = Budget(0.03, clock=clock, window_s=1.0)
    simulate(budget, clock, 200, stream=0.020)  # a viewer on every head; history off
    assert budget.levels["stats"] == 0 and budget.levels["snapshots"] == 0
    assert budget.levels["stream"] >= 2
    assert budget.overhead <= 0.03
    assert budget.text().startswith(f"stream frames at 1/{budget.stream_factor} rate")


def test_the_text_says_what_is_thinned(clock: FakeClock) -> None:
    budget = Budget(0.03, clock=clock, window_s=1.0)
    simulate(budget, clock, 100, stats=0.008)  # 8 %: every 4 steps brings it to 2 %
    assert budget.stats_every == 4
    assert budget.text() == "stats every 4 steps to stay under 3 % (now 2 ± 0 %, measured)"
    status = budget.status()
    assert status["thinned"]["stats_every"] == 4 and status["text"] == budget.text()


def test_a_cost_no_cpu_accounting_sees_is_measured_and_thinned(clock: FakeClock) -> None:
    """Statistics slow each step by 8 % without any CPU time of ours (another thread holding
    the GIL, kernels queued on a device): the off windows measure it, the budget says so
    and thins the statistics until the measured slowdown is under the budget."""
    budget = Budget(0.03, clock=clock, window_s=1.0)
    simulate(budget, clock, 150, hidden=0.008)
    assert budget.cpu_overhead == pytest.approx(0.0, abs=1e-9)  # accounting sees nothing
    assert budget.source == "measured" and budget.stats_every > 1
    simulate(budget, clock, 600, hidden=0.008)
    status = budget.status()
    assert status["measured"]["windows"] >= 2
    assert status["measured"]["slowdown"] <= 0.03 * 0.8 + 1e-9
    assert budget.overhead == pytest.approx(0.08 / budget.stats_every, rel=0.01)
    assert budget.text().startswith(f"stats every {budget.stats_every} steps to stay under 3 %")
    assert budget.text().endswith("%, measured)")


def test_a_measure_only_budget_never_switches_the_dashboard_off(clock: FakeClock) -> None:
    budget = Budget(None, clock=clock, window_s=1.0)
    offs = 0
    for _ in range(300):
        offs += budget.off
        simulate(budget, clock, 1, stats=0.01)
    assert offs == 0 and budget.status()["measured"] is None


def test_recovers_when_well_under_budget(clock: FakeClock) -> None:
    budget = Budget(0.03, clock=clock, window_s=1.0)
    simulate(budget, clock, 300, stats=0.010, snapshots=0.010, stream=0.010)
    assert any(budget.levels.values())
    levels = simulate(budget, clock, 1200)  # the slowness went away: restored as measured
    assert budget.levels == {"stats": 0, "snapshots": 0, "stream": 0, "views": 0}
    assert budget.text().startswith("dashboard at 0 ± 0 % of training time (measured; "
                                    "budget 3 %)")
    # One level per window, never up again on the way down.
    assert all(sum(b.values()) <= sum(a.values())
               for a, b in zip(levels, levels[1:], strict=False))


def test_no_flapping_under_a_steady_cost(clock: FakeClock) -> None:
    budget = Budget(0.03, clock=clock, window_s=1.0)
    settle = simulate(budget, clock, 200, stats=0.004, stream=0.003)
    steady = simulate(budget, clock, 2000, stats=0.004, stream=0.003)
    # a few restores wait for the next measured slowdown (one every 64 steps)
    assert changes(settle) <= 6
    assert changes(steady) == 0
    assert budget.overhead <= 0.03


def test_restores_only_what_fits(clock: FakeClock) -> None:
    # 5 % thinned to 1.25 % (stats every 4): under half the budget, but restoring one
    # level would double it to 2.5 %, over 80 % of the budget: it stays.
    budget = Budget(0.03, clock=clock, window_s=1.0)
    levels = simulate(budget, clock, 400, stats=0.005)
    assert budget.stats_every in (2, 4)
    assert changes(levels[100:]) == 0


def test_a_full_writer_queue_thins_the_history(clock: FakeClock) -> None:
    budget = Budget(0.03, clock=clock, window_s=1.0)
    simulate(budget, clock, 20, stats=0.001)
    assert budget.stats_every == 1
    budget.queue_full()
    simulate(budget, clock, 20, stats=0.001)
    assert budget.stats_every == 2 and budget.status()["dropped"] == 1
    assert "stats every 2 steps" in budget.text()
    simulate(budget, clock, 20, stats=0.001)  # held a few windows after the last drop
    assert budget.stats_every == 2
    simulate(budget, clock, 100, stats=0.001)  # then restored (1 % fits well)
    assert budget.stats_every == 1


def test_helper_threads_add_from_anywhere(clock: FakeClock) -> None:
    budget = Budget(None, clock=clock, window_s=1.0)
    simulate(budget, clock, 1)  # the first step: windows start there
    threads = [threading.Thread(target=lambda: [budget.spend_helper("stream", 1e-4)
                                                for _ in range(1000)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    simulate(budget, clock, 12)  # one window of 10 or 11 steps of 100 ms
    assert 0.4 / 1.1 - 1e-9 <= budget.costs["stream"] <= 0.4 / 1.0 + 1e-9


def test_no_budget_measures_but_never_thins(clock: FakeClock) -> None:
    budget = Budget(None, clock=clock, window_s=1.0)
    simulate(budget, clock, 200, stats=0.05, stream=0.05)
    assert not any(budget.levels.values())
    assert budget.overhead == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, True, "3%"])
def test_bad_budgets_are_refused_by_name(bad: object) -> None:
    with pytest.raises(ValueError, match="max_overhead"):
        Budget(bad)  # type: ignore[arg-type]


def test_the_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ATTNSCOPE_MAX_OVERHEAD", raising=False)
    assert overhead_from_env("max_overhead", 0.03) == 0.03
    monkeypatch.setenv("ATTNSCOPE_MAX_OVERHEAD", "0.01")
    assert overhead_from_env("max_overhead", 0.03) == 0.01
    monkeypatch.setenv("ATTNSCOPE_MAX_OVERHEAD", "3%")
    with pytest.raises(ValueError, match="ATTNSCOPE_MAX_OVERHEAD"):
        overhead_from_env("max_overhead", 0.03)
    monkeypatch.setenv("ATTNSCOPE_IDLE_OVERHEAD", "0")
    with pytest.raises(ValueError, match="ATTNSCOPE_IDLE_OVERHEAD must be a number in"):
        overhead_from_env("idle_overhead", 0.01)


def test_nobody_watching_is_held_to_the_idle_limit(clock: FakeClock) -> None:
    """The history's statistics cost 1.5 %: within the 3 % budget, over the 1 % one allowed
    while nobody watches. Unwatched they are thinned under 1 %; once someone watches, they
    come back (and the text says which limit is in force)."""
    budget = Budget(0.03, idle_overhead=0.01, clock=clock, window_s=1.0)
    assert budget.limit == 0.01 and not budget.watched
    simulate(budget, clock, 200, stats=0.0015)
    assert budget.stats_every == 2 and budget.overhead <= 0.01
    assert budget.text().startswith("stats every 2 steps to stay under 1 % while nobody watches")
    status = budget.status()
    assert (status["limit"], status["watched"], status["max_overhead"]) == (0.01, False, 0.03)
    budget.set_watched(True)
    simulate(budget, clock, 300, stats=0.0015)
    assert budget.watched and budget.limit == 0.03 and budget.stats_every == 1
    assert budget.text().endswith("(measured; budget 3 %)")
    budget.set_watched(False)  # the viewer left: thinned again
    simulate(budget, clock, 200, stats=0.0015)
    assert budget.stats_every == 2


def test_nobody_watching_never_thins_the_stream(clock: FakeClock) -> None:
    """The history costs far over the idle limit even at its thinnest: the stream, which
    costs nothing while nobody watches, is left alone, so the next viewer gets frames at
    the rate asked for."""
    budget = Budget(0.03, idle_overhead=0.01, clock=clock, window_s=1.0)
    simulate(budget, clock, 600, stats=0.2, snapshots=0.2)
    assert budget.levels["stats"] == 6 and budget.levels["snapshots"] == 5
    assert budget.levels["stream"] == 0 and budget.levels["views"] == 0


@pytest.mark.parametrize("idle", [None, 0.05])
def test_the_idle_limit_never_exceeds_the_budget(clock: FakeClock, idle: float | None) -> None:
    budget = Budget(0.03, idle_overhead=idle, clock=clock)
    assert budget.limit == 0.03 and "while nobody watches" not in budget.text()
    assert Budget(1, idle_overhead=0.01).limit == 1  # a budget of 1 never thins


def test_the_setting_reaches_the_run(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from pydantic import ValidationError

    from attnscope import Dashboard
    from attnscope.settings import Settings
    from transformer_core.builders import TransformerEncoderBuilder

    monkeypatch.setenv("ATTNSCOPE_MAX_OVERHEAD", "0.02")
    assert Settings().max_overhead == 0.02
    with pytest.raises(ValidationError, match="max_overhead"):
        Settings(max_overhead=0)
    model = TransformerEncoderBuilder.from_kwargs(
        n_layers=1, n_heads=2, query_dimensions=4, value_dimensions=4,
        feed_forward_dimensions=8).get()
    with Dashboard.start(model, port=0, quiet=True, settings=Settings(data_dir=tmp_path)) as dash:
        assert dash.run.budget.max_overhead == 0.02  # ATTNSCOPE_MAX_OVERHEAD
    with Dashboard.start(model, port=0, quiet=True, settings=Settings(data_dir=tmp_path),
                         max_overhead=0.01) as dash:
        assert dash.run.budget.max_overhead == 0.01
        assert dash.run.summary()["budget"]["text"].endswith("(budget 1 %)")
    monkeypatch.setenv("ATTNSCOPE_IDLE_OVERHEAD", "0.005")
    with Dashboard.start(model, port=0, quiet=True, settings=Settings(data_dir=tmp_path)) as dash:
        assert (dash.run.budget.max_overhead, dash.run.budget.idle_overhead) == (0.02, 0.005)
        assert dash.run.summary()["budget"]["text"].endswith(
            "(budget 0.5 % while nobody watches)")


def test_a_floor_is_held_and_never_restored_below(clock: FakeClock) -> None:
    budget = Budget(0.03, clock=clock, window_s=1.0)
    budget.hold_at_least("snapshots", 3)  # the recorder knows a probe pass's cost
    assert budget.snapshot_stride == 8
    simulate(budget, clock, 300)  # nothing costs anything: everything else recovers
    assert budget.levels["snapshots"] == 3 and "snapshots 8x further apart" in budget.text()
    budget.hold_at_least("snapshots", 99)  # capped at the knob's limit
    assert budget.snapshot_stride == 32


def test_a_pause_between_steps_does_not_stretch_the_step_time(clock: FakeClock) -> None:
    # The step time spaces stream frames on slow steps: a 5-minute evaluation between two
    # steps must not space them as if every step took minutes (no frame for that long).
    budget = Budget(0.03, clock=clock, window_s=1.0)
    simulate(budget, clock, 20, step_s=10.0)
    assert budget.step_time == pytest.approx(10.0)
    clock.advance(300.0)  # the loop stops calling step() for 5 minutes
    simulate(budget, clock, 1, step_s=10.0)
    assert budget.step_time <= 11.0 + 1e-9  # at most 10 % longer after one gap
    simulate(budget, clock, 10, step_s=10.0)
    assert budget.step_time < 10.5


def test_a_real_change_of_step_time_is_followed(clock: FakeClock) -> None:
    budget = Budget(0.03, clock=clock, window_s=1.0)
    simulate(budget, clock, 20, step_s=1.0)
    simulate(budget, clock, 60, step_s=10.0)  # a longer sequence length from here on
    assert budget.step_time == pytest.approx(10.0, rel=0.02)
