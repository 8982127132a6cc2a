"""The demo run: the reversal task, its model, and its training loop (server/training/demo.py)."""

from __future__ import annotations

import doctest
import math
import threading
import time

import pytest
import torch

import attnscope.training.demo as demo
from attnscope.training.demo import (
    DemoConfig,
    DemoModel,
    DemoTraining,
    ReverseTask,
    StepResult,
    symbol_labels,
    train_until,
)
from transformer_core.events import AttentionEvent, EventDispatcher
from transformer_core.events.filters import from_layer

SMALL = {"seq_len": 8, "n_symbols": 5, "batch_size": 4, "device": "cpu"}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Train on one intra-op thread, restored afterwards.

    The demo's matrices are tiny (64 x 24 x 64). On this shared 2-core machine,
    with other processes busy, two intra-op threads measured 60-380 ms per step
    against 17 ms for one (oversubscribed cores); one thread keeps the tests'
    timing independent of the machine's load.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def anti_diagonal_mass(attention: torch.Tensor) -> torch.Tensor:
    """Mean weight on the anti-diagonal per head: (H, L, L) -> (H,)."""
    L = attention.shape[-1]
    rows = torch.arange(L)
    return attention[:, rows, L - 1 - rows].mean(-1)


def test_doctests_in_module_pass():
    result = doctest.testmod(demo)
    assert result.attempted > 0 and result.failed == 0


# --- the task -----------------------------------------------------------------


def test_targets_are_the_reversed_inputs():
    task = ReverseTask(DemoConfig(seq_len=24, n_symbols=16))
    inputs, targets = task.batch(32)
    assert inputs.shape == targets.shape == (32, 24)
    assert inputs.dtype == targets.dtype == torch.long
    for i in range(24):
        assert torch.equal(targets[:, i], inputs[:, 23 - i])
    assert int(inputs.min()) >= 0 and int(inputs.max()) < 16
    # every symbol shows up: the task draws from the whole vocabulary
    assert set(inputs.flatten().tolist()) == set(range(16))


def test_labels_map_token_ids_to_symbols():
    task = ReverseTask(DemoConfig(n_symbols=4))
    assert task.symbols == ["A", "B", "C", "D"]
    assert task.labels(torch.tensor([[0, 3, 1], [2, 2, 0]])) == [["A", "D", "B"], ["C", "C", "A"]]
    with pytest.raises(ValueError, match="token_ids"):
        task.labels(torch.tensor([0, 1]))


def test_symbol_labels_are_distinct_beyond_the_alphabet():
    labels = symbol_labels(100)
    assert len(set(labels)) == 100
    assert labels[:3] == ["A", "B", "C"] and labels[26] == "a"


def test_same_seed_same_batches_other_seed_other_batches():
    first = ReverseTask(DemoConfig(seed=3)).batch(8)[0]
    again = ReverseTask(DemoConfig(seed=3)).batch(8)[0]
    other = ReverseTask(DemoConfig(seed=4)).batch(8)[0]
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


# --- configuration ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seq_len", 3),
        ("seq_len", 513),
        ("seq_len", 24.0),
        ("n_symbols", 1),
        ("n_layers", 0),
        ("n_heads", 0),
        ("d_head", -4),
        ("feed_forward", 0),
        ("batch_size", 0),
        ("batch_size", True),
        ("warmup_steps", -1),
        ("lr", 0.0),
        ("lr", float("nan")),
        ("lr", "fast"),
        ("seed", 1.5),
        ("device", "potato"),
        ("device", 0),
        ("attention_type", "sparse"),
        ("attention_type", "causal-linear"),
    ],
)
def test_validate_names_the_bad_field(field, value):
    config = DemoConfig(**{field: value})
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        config.validate()
    # every entry point validates: no half-built run from a bad config
    with pytest.raises(ValueError, match=field):
        DemoTraining(config)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="device 'cuda'.*CUDA is not available"):
        DemoConfig(device="cuda").validate()


def test_defaults_are_valid_and_auto_device_picks_what_is_there():
    config = DemoConfig()
    config.validate()
    assert 16 <= config.seq_len <= 32
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert demo.resolve_device("auto").type == expected
    assert config.to_dict()["seq_len"] == config.seq_len
    assert config.d_model == config.n_heads * config.d_head


# --- the model --------------------------------------------------------------------


def test_model_maps_tokens_to_logits_over_symbols():
    config = DemoConfig(**SMALL, n_layers=2)
    model = DemoModel(config)
    assert len(model.encoder.layers) == 2
    assert model.embedding.num_embeddings == 5 and model.position.num_embeddings == 8
    logits = model(torch.zeros(3, 8, dtype=torch.long))
    assert logits.shape == (3, 8, 5)
    with pytest.raises(ValueError, match=r"L <= 8"):
        model(torch.zeros(3, 9, dtype=torch.long))


# --- training steps ----------------------------------------------------------------


def test_one_step_reports_finite_numbers_for_the_batch_it_trained_on():
    config = DemoConfig(**SMALL)
    training = DemoTraining(config)
    before = [p.detach().clone() for p in training.model.parameters()]
    result = training.step()
    assert isinstance(result, StepResult)
    assert result.step == 0 and training.steps_done == 1
    assert math.isfinite(result.loss) and result.loss > 0
    # an untrained model is about as good as a guess: loss near log(V)
    assert abs(result.loss - math.log(5)) < 1.5
    assert 0.0 <= result.accuracy <= 1.0
    # the labels are those of the batch the step drew (same seed, same first batch)
    inputs, _ = ReverseTask(config).batch(config.batch_size)
    assert result.tokens == ReverseTask(config).labels(inputs)
    changed = [not torch.equal(b, p) for b, p in zip(before, training.model.parameters(),
                                                     strict=True)]
    assert all(changed), "one step must update every parameter"
    assert training.step().step == 1


def test_each_step_is_one_forward_pass_one_event_per_layer():
    dispatcher = EventDispatcher()
    training = DemoTraining(DemoConfig(**SMALL, n_layers=3), event_dispatcher=dispatcher)
    sources = []
    dispatcher.listen(AttentionEvent, lambda event: sources.append(event.source))
    training.step()
    inner = [layer.attention.inner_attention for layer in training.model.encoder.layers]
    assert sources == inner
    training.step()
    assert len(sources) == 6


def test_steps_yields_exactly_max_steps_consecutive_results():
    training = DemoTraining(DemoConfig(**SMALL))
    assert [r.step for r in training.steps(3)] == [0, 1, 2]
    assert [r.step for r in training.steps(2)] == [3, 4]
    assert list(training.steps(0)) == []
    with pytest.raises(ValueError, match="max_steps"):
        next(training.steps(-1))


def test_max_rate_paces_the_steps():
    training = DemoTraining(DemoConfig(**SMALL))
    start = time.monotonic()
    assert len(list(training.steps(6, max_rate=50.0))) == 6
    assert time.monotonic() - start >= 5 / 50.0  # 5 gaps of 20 ms at least
    for bad in (0, -1.0, float("inf"), "fast"):
        with pytest.raises(ValueError, match="max_rate"):
            next(training.steps(1, max_rate=bad))


def test_loss_falls_within_a_couple_hundred_steps():
    training = DemoTraining(DemoConfig(batch_size=32, device="cpu"))
    losses = [r.loss for r in training.steps(100)]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert first > 0.8 * math.log(training.config.n_symbols)  # starts at chance
    assert last < 0.5 * first, f"loss went from {first:.3f} to {last:.3f}"


def test_evaluate_restores_mode_and_leaves_the_training_stream_alone():
    config = DemoConfig(**SMALL)
    dispatcher = EventDispatcher()
    training, twin = DemoTraining(config, event_dispatcher=dispatcher), DemoTraining(config)
    heard = []
    dispatcher.listen(lambda event: True, heard.append)
    for mode in (True, False):
        training.model.train(mode)
        accuracy = training.evaluate(n_batches=2)
        assert training.model.training is mode
        assert 0.0 <= accuracy <= 1.0
    assert training.evaluate(2) == training.evaluate(2)  # the same held-out batches
    assert heard == [], "the dashboard must not see evaluation batches"
    # evaluation consumed no training batches: both runs see the same next step
    assert training.step().tokens == twin.step().tokens
    assert len(heard) > 0  # training steps are heard again
    with pytest.raises(ValueError, match="n_batches"):
        training.evaluate(0)


def test_reset_starts_over_in_place():
    config = DemoConfig(**SMALL)
    training, fresh = DemoTraining(config), DemoTraining(config)
    layer = training.model.encoder.layers[0]
    first = training.step()
    for _ in training.steps(5):
        pass
    training.reset()
    assert training.steps_done == 0
    assert training.model.encoder.layers[0] is layer  # layer filters stay valid
    for mine, theirs in zip(training.model.parameters(), fresh.model.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    again = training.step()
    assert (again.step, again.tokens) == (0, first.tokens)
    assert again.loss == pytest.approx(first.loss, rel=1e-6)


def test_reset_from_another_thread_while_training():
    training = DemoTraining(DemoConfig(**SMALL))
    errors = []

    def train():
        try:
            for _ in training.steps(200):
                pass
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    worker = threading.Thread(target=train)
    worker.start()
    for _ in range(5):
        training.reset()
    worker.join(timeout=60)
    assert not worker.is_alive() and errors == []
    assert 0 < training.steps_done <= 200


def test_model_init_does_not_touch_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    DemoTraining(DemoConfig(**SMALL)).reset()
    assert torch.equal(torch.rand(3), expected)


# --- the command line --------------------------------------------------------------


def test_cli_trains_to_the_target_and_stops(capsys):
    code = demo.main(["--seq-len", "8", "--n-symbols", "5", "--max-seconds", "60"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "reached" in out and "steps in" in out


def test_cli_stops_when_time_runs_out(capsys):
    assert demo.main(["--max-seconds", "0"]) == 1
    assert "did not reach 0.95" in capsys.readouterr().out


def test_cli_bad_value_names_the_field(capsys):
    assert demo.main(["--seq-len", "2"]) == 2
    assert "seq_len" in capsys.readouterr().out


# --- the whole run ------------------------------------------------------------------


@pytest.mark.slow
def test_demo_learns_reversal_and_its_heads_show_the_anti_diagonal():
    dispatcher = EventDispatcher()
    training = DemoTraining(DemoConfig(), event_dispatcher=dispatcher)
    report = train_until(training, target=0.95, max_seconds=180)
    assert report.reached, f"{report.accuracy:.3f} after {report.steps} steps, {report.seconds} s"
    for _ in training.steps(200):  # the demo keeps training while users watch
        pass

    # what the dashboard sees: the last layer's attention, read through a listener
    last = training.model.encoder.layers[-1]
    seen = []
    dispatcher.listen(from_layer(last.attention.inner_attention) & AttentionEvent,
                      lambda event: seen.append(event.attention_matrix.detach().cpu()))
    inputs, _ = training.task.batch(64)
    training.model.eval()
    with torch.no_grad():
        training.model(inputs.to(training.device))
    assert len(seen) == 1
    mean = seen[0].mean(0)  # (H, L, S)
    mass = anti_diagonal_mass(mean)
    best = int(mass.argmax())
    assert float(mass[best]) > 0.5, f"anti-diagonal weight per head: {mass.tolist()}"
    L = training.config.seq_len
    assert torch.equal(mean[best].argmax(-1), torch.arange(L - 1, -1, -1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_demo_trains_on_the_gpu_when_there_is_one():
    training = DemoTraining(DemoConfig(device="auto"))
    assert training.device.type == "cuda"
    assert next(training.model.parameters()).is_cuda
    report = train_until(training, target=0.95, max_seconds=120)
    assert report.reached

