"""The run registry: layer discovery, step(), pause, jobs between steps, failures."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.nn as nn
from stream_support import Wrapped, small_encoder

from attnscope.training.run import Run, RunRegistry, RunStateError, UnknownRunError
from transformer_core.builders import TransformerDecoderBuilder
from transformer_core.events import EventDispatcher


def test_layers_of_a_wrapped_model_in_module_order():
    dispatcher = EventDispatcher()
    run = Run(Wrapped(small_encoder(dispatcher, n_layers=3), 8), run_id="w")
    assert [s.name for s in run.sites] == [
        f"encoder.layers.{i}.attention.inner_attention" for i in range(3)]
    assert run.dispatchers == [dispatcher]
    assert run.model_summary()["layers"] == 3


def test_decoder_layers_are_self_then_cross():
    model = TransformerDecoderBuilder.from_kwargs(
        n_layers=2, n_heads=2, query_dimensions=4, value_dimensions=4,
        feed_forward_dimensions=8, cross_attention_type="linear").get()
    run = Run(model, run_id="dec")
    assert [(s.role, s.attention_type) for s in run.sites] == [
        ("self", "full"), ("cross", "linear"), ("self", "full"), ("cross", "linear")]
    assert run.model_summary()["attention_type"] == "mixed"


def test_model_without_attention_is_rejected():
    with pytest.raises(ValueError, match="no attention module found in Linear"):
        Run(nn.Linear(2, 2))


def test_step_records_scalars_and_token_labels():
    run = Run(small_encoder(EventDispatcher()), run_id="r", symbols=["A", "B", "C"])
    run.step(4, loss=torch.tensor(0.5), tokens=torch.tensor([[0, 2, 1], [1, 1, 9]]), lr=1e-3)
    assert run.step_index == 4 and run.scalars == {"loss": 0.5, "lr": 1e-3}
    assert run.labels(0) == ["A", "C", "B"] and run.labels(1) == ["B", "B", "9"]
    assert (run.batch_size, run.seq_len) == (2, 3)
    assert run.labels(5) is None
    with pytest.raises(TypeError, match="scalar 'acc'"):
        run.step(5, acc="high")
    with pytest.raises(ValueError, match="tokens"):
        run.step(5, tokens=torch.zeros(3))


def test_pause_blocks_step_and_jobs_run_in_the_training_thread():
    run = Run(small_encoder(EventDispatcher()), run_id="r")
    run.pause()
    assert run.status == "paused"
    ran_in = []
    done = threading.Event()

    def train():
        run.step(0)
        done.set()

    thread = threading.Thread(target=train)
    thread.start()
    assert not done.wait(0.2)  # blocked by the pause
    assert run.call_between_steps(lambda: ran_in.append(threading.current_thread()) or 42) == 42
    assert ran_in == [thread]  # jobs run while paused, in the training thread
    run.resume()
    assert done.wait(5)
    thread.join()


def test_call_between_steps_times_out_then_runs_directly_once_ended():
    run = Run(small_encoder(EventDispatcher()), run_id="r")
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="step boundary"):
        run.call_between_steps(lambda: 1, timeout=0.1)
    assert time.monotonic() - t0 < 2
    run.close()
    assert run.call_between_steps(lambda: threading.current_thread()) is \
        threading.current_thread()


def test_a_jobs_exception_is_handed_back_and_training_goes_on():
    run = Run(small_encoder(EventDispatcher()), run_id="r")
    run.pause()
    stepped = []
    thread = threading.Thread(target=lambda: [run.step(i) or stepped.append(i) for i in (0, 1)])
    thread.start()

    def bad_job():
        raise ValueError("the model rejected this input")

    def slow_job():
        raise TimeoutError("the job's own timeout")

    with pytest.raises(ValueError, match="rejected"):
        run.call_between_steps(bad_job)
    with pytest.raises(TimeoutError, match="own timeout"):  # not "did not reach a step"
        run.call_between_steps(slow_job)
    run.resume()
    thread.join(5)
    assert stepped == [0, 1] and run.status == "live"


def test_fail_ends_the_run_with_the_error_text_and_releases_a_pause():
    run = Run(small_encoder(EventDispatcher()), run_id="r")
    run.pause()
    released = threading.Event()
    thread = threading.Thread(target=lambda: (run.step(0), released.set()))
    thread.start()
    run.fail(ValueError("bad batch"))
    assert released.wait(5)
    thread.join()
    assert run.status == "ended" and run.error == "ValueError: bad batch"
    with pytest.raises(RunStateError, match="has ended"):
        run.resume()


def test_registry_ids_and_change_notifications():
    registry = RunRegistry()
    changes = []
    registry.add_listener(lambda: changes.append(1))
    run = registry.add(Run(small_encoder(EventDispatcher()), run_id="a"))
    assert registry.unique_id("a") == "a-2"
    run.pause()
    assert len(changes) == 2
    with pytest.raises(ValueError, match="already registered"):
        registry.add(Run(small_encoder(EventDispatcher()), run_id="a"))
    with pytest.raises(UnknownRunError, match="unknown run 'b'; known runs: a"):
        registry.get("b")
    registry.remove("a")
    assert registry.ids() == [] and len(changes) == 3
