"""Pinned inputs and captures as the page draws them: a text captured again every k steps
through the run interface alone (any kind of run), within its cost rule, thinned, kept
across a restart, unpinned with its captures; the page's frames and head roles of a
capture; a capture whose client hangs up is not kept."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from captures_support import SMALL, demo_run, make_app, serve
from fastapi.testclient import TestClient

from attnscope.backend.app import create_app
from attnscope.backend.captures.pinned import PinnedCaptures
from attnscope.backend.captures.requests import CaptureLimits
from attnscope.backend.captures.store import CaptureStore
from attnscope.contract.layout import LocalModel
from attnscope.contract.protocol import decode_frame
from attnscope.core.capture import run_capture
from attnscope.core.run_base import BaseRun, RunRegistry
from attnscope.settings import Settings
from attnscope.training.demo import DemoModel, symbol_labels

PINS = "/api/v1/pins"
CAPTURES = "/api/v1/captures"


def wait_until(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class InterfaceRun(BaseRun):
    """A run the server knows only through the run interface (``BaseRun``): steps are
    recorded by whoever feeds it, captures go through :meth:`capture`, as for a run
    whose model is in another process. ``pass_s`` is what each pass costs (on ``clock``)."""

    def __init__(self, clock=None, pass_s: float = 0.0) -> None:
        torch.manual_seed(0)
        self.model = DemoModel(SMALL)
        self.local = LocalModel(self.model)
        super().__init__("elsewhere", self.local.layout, symbols=symbol_labels(SMALL.n_symbols))
        self.captured_at: list[int | None] = []
        self.clock, self.pass_s = clock, pass_s

    def capture(self, inputs, kinds, layers, heads, max_bytes, timeout):
        self.captured_at.append(self.step_index)
        if self.clock is not None:
            self.clock.now += self.pass_s
        out = run_capture(self.model, inputs, kinds, layers, heads, max_bytes, local=self.local)
        return {k: v.numpy() for k, v in out.items()}, self.step_index

    def train_to(self, step: int) -> None:
        """Steps up to ``step``, each changing the weights a little (so heads evolve)."""
        for s in range((self.step_index or 0) + 1 if self.step_index is not None else 0,
                       step + 1):
            with torch.no_grad():
                for p in self.model.parameters():
                    p.add_(torch.randn_like(p) * 0.05)
            self.record_step(s, {"loss": 1.0}, time.time())


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CaptureStore]:
    with CaptureStore(tmp_path / "captures") as s:
        yield s


def scheduler(run: BaseRun, store: CaptureStore, clock=time.time, **settings) -> PinnedCaptures:
    """Pins of ``run`` with these ``pinned_*`` settings (no time floor, a lax budget)."""
    registry = RunRegistry()
    registry.add(run)
    values = {"pinned_min_interval_s": 0.0, "max_overhead": 1.0, "captures_timeout_s": 5,
              **settings}
    return PinnedCaptures.from_settings(registry, store, Settings(port=0, **values),
                                        clock).start()


def test_a_pinned_text_is_captured_every_k_steps_through_the_run_interface(store):
    run = InterfaceRun()
    pins = scheduler(run, store)
    try:
        pin = pins.add("elsewhere", text="ABCDEF", every=5)
        wait_until(lambda: len(pin.captures) == 1, 10, "the first capture")
        assert run.captured_at == [None]  # at once: nobody stepped yet
        for step, due in ((3, False), (4, True), (7, False), (9, True), (12, False),
                          (20, True)):
            held = len(pin.captures)
            run.train_to(step)
            if due:
                wait_until(lambda n=held: len(pin.captures) > n, 10, f"a capture at {step}")
            else:
                time.sleep(0.6)  # the scheduler looks a few times a second: not due yet
                assert len(pin.captures) == held, step
    finally:
        pins.close()
    assert [c.step for c in pin.captures] == [None, 4, 9, 20]  # never fewer than 5 apart
    first, last = (store.load(c.id)["attention.0"] for c in (pin.captures[1], pin.captures[-1]))
    assert first.shape == last.shape == (1, 2, 6, 6)
    assert not np.allclose(first, last)  # the same input, its heads changed with training
    record = store.get(pin.captures[-1].id)
    assert record.meta["pin"] == pin.id and record.meta["labels"] == [list("ABCDEF")]
    assert record.meta["text"] == "ABCDEF"


def test_the_cost_rule_spaces_captures_by_what_they_took(store):
    clock = Clock()
    run = InterfaceRun(clock, pass_s=0.3)
    pins = scheduler(run, store, clock, max_overhead=0.03)  # a third: 1 %
    try:
        pin = pins.add("elsewhere", text="ABC", every=1)
        wait_until(lambda: len(pin.captures) == 1, 10, "the first capture")
        run.train_to(40)
        state, next_step, not_before, message = pins.state(pin)
        # 0.3 s a capture at 1 % of training time: at least 30 s between two
        assert state == "waiting" and next_step == 0
        assert not_before == pytest.approx(1000.3 + 30.0) and "not before 30 s" in message
        time.sleep(0.6)
        assert len(pin.captures) == 1  # 40 steps on, yet not due
        clock.now += 31
        wait_until(lambda: len(pin.captures) == 2, 10, "the capture once 30 s have passed")
        assert pin.captures[-1].step == 40
    finally:
        pins.close()


def test_pins_keep_a_bounded_thinned_set_and_survive_a_restart(store):
    run = InterfaceRun()
    pins = scheduler(run, store, pinned_keep=4)
    try:
        pin = pins.add("elsewhere", text="AB", every=1)
        for step in range(8):
            wait_until(lambda n=step: pin.taken > n, 10, f"capture {step}")
            run.train_to(step)
        wait_until(lambda: pin.taken >= 9, 10, "nine captures")
    finally:
        pins.close()
    kept = [c.seq for c in pin.captures]
    assert len(kept) == 4 and kept[0] == 0 and kept[-1] == pin.taken - 1  # first and newest
    assert store.list(run="elsewhere")[1] == 4  # the thinned ones are deleted
    again = scheduler(run, store)  # a new server on this store
    try:
        [back] = again.list("elsewhere")
        assert back.id == pin.id and [c.id for c in back.captures] == [c.id for c in pin.captures]
        again.remove(pin.id)
        assert again.list() == [] and store.list(run="elsewhere")[1] == 0
    finally:
        again.close()


def test_pins_over_http_say_what_comes_next_and_refuse_what_cannot_work(tmp_path):
    run = InterfaceRun()
    registry = RunRegistry()
    registry.add(run)
    settings = Settings(data_dir=tmp_path, port=0, history_enabled=False, pinned_every=5,
                        pinned_min_interval_s=0, pinned_max_per_run=2, max_overhead=1.0)
    with TestClient(create_app(settings, registry), base_url="http://127.0.0.1") as c:
        made = c.post(PINS, json={"run": "elsewhere", "text": "ABCD"})
        assert made.status_code == 201, made.text
        assert made.headers["location"] == f"{PINS}/{made.json()['id']}"
        pin = made.json()
        assert pin["every"] == 5 and pin["text"] == "ABCD"

        def shown() -> dict:
            return c.get(f"{PINS}/{pin['id']}").json()

        wait_until(lambda: len(shown()["captures"]) == 1, 10, "the first capture")
        run.train_to(2)
        now = shown()
        assert now["state"] == "waiting" and now["next_step"] == 4
        assert now["message"] == "next capture after step 4"
        listed = c.get(PINS, params={"run": "elsewhere"}).json()["items"]
        assert [p["id"] for p in listed] == [pin["id"]]
        capture = c.get(f"{CAPTURES}/{now['captures'][0]['id']}").json()
        assert capture["pin"] == pin["id"] and capture["text"] == "ABCD"
        # refusals name the field or the limit
        bad = c.post(PINS, json={"run": "elsewhere", "text": "AXB"})
        assert bad.status_code == 422 and "unknown symbol 'X'" in bad.text
        gone = c.post(PINS, json={"run": "nope", "text": "AB"})
        assert gone.status_code == 422 and "known runs: elsewhere" in gone.text
        assert c.post(PINS, json={"run": "elsewhere", "tokens": [1, 2]}).status_code == 201
        full = c.post(PINS, json={"run": "elsewhere", "tokens": [3]})
        assert full.status_code == 409 and "unpin one" in full.text
        assert c.patch(f"{PINS}/{pin['id']}", json={"every": 2}).json()["every"] == 2
        run.close()
        assert shown()["state"] == "ended" and "ended" in shown()["message"]
        assert c.delete(f"{PINS}/{pin['id']}").status_code == 204
        assert c.get(f"{PINS}/{pin['id']}").status_code == 404
        assert c.get(f"{CAPTURES}/{now['captures'][0]['id']}").status_code == 404


def test_an_input_refused_where_it_is_tokenized_stops_the_pin_with_its_reason(store):
    run = InterfaceRun()
    run.capture = lambda *a, **k: (_ for _ in ()).throw(IndexError("index out of range"))
    pins = scheduler(run, store)
    try:
        pin = pins.add("elsewhere", text="ABC")
        wait_until(lambda: pin.error is not None, 10, "the failed capture")
        state, _, _, message = pins.state(pin)
        assert state == "failed" and message == "stopped: text: the model rejected this " \
                                                "input: index out of range"
    finally:
        pins.close()


# -- a capture as the page draws it --------------------------------------------------


def test_a_capture_as_frames_with_its_tokens_and_its_heads_roles(tmp_path):
    with serve(make_app(tmp_path)) as url, httpx.Client(base_url=url, timeout=30) as c:
        made = c.post(CAPTURES, json={"run": "demo", "text": "ABCDEFGH",
                                      "kinds": ["attention", "qk_logits"]}).json()
        frame = c.get(f"{CAPTURES}/{made['id']}/frame", params={"layer": 1, "heads": "1"})
        assert frame.status_code == 200
        header, values = decode_frame(frame.content)
        assert header["capture"] == made["id"] and header["kind"] == "attention"
        assert header["labels"] == {"queries": list("ABCDEFGH"), "keys": list("ABCDEFGH")}
        assert header["heads"] == [1] and values.shape == (1, 8, 8)
        np.testing.assert_allclose(values.astype(np.float32).sum(-1), 1, atol=1e-2)
        pooled, _ = decode_frame(c.get(f"{CAPTURES}/{made['id']}/frame",
                                       params={"kind": "qk_logits", "max_side": 4}).content)
        assert pooled["pool"] == 2 and pooled["labels"]["queries"] == ["A…B", "C…D", "E…F",
                                                                        "G…H"]
        heads = c.get(f"{CAPTURES}/{made['id']}/heads").json()
        assert heads["capture"] == made["id"] and heads["events"] == []
        assert [(h["layer"], h["head"]) for h in heads["heads"]] == [(0, 0), (0, 1), (1, 0),
                                                                     (1, 1)]
        assert all(0 <= h["stats"]["entropy"] <= 1 for h in heads["heads"])
        assert all(h["scores"]["induction"] is None for h in heads["heads"])
        missing = c.get(f"{CAPTURES}/{made['id']}/frame", params={"layer": 5})
        assert missing.status_code == 422 and "holds no attention.5" in missing.text
        assert c.get(f"{CAPTURES}/{made['id']}/frame", params={"heads": "7"}).status_code == 422
        assert c.get(f"{CAPTURES}/0123/heads").status_code == 404
        what = c.get(f"{CAPTURES}/input", params={"run": "demo"}).json()
        assert what["text"] and what["tokens"] and what["message"] is None


def test_what_input_a_run_takes_is_said_before_anyone_types(tmp_path):
    from attnscope.training.run import Run
    from transformer_core.builders import TransformerEncoderBuilder

    plain = Run(DemoModel(SMALL), run_id="ids")  # token ids, no tokenizer, no symbols
    features = Run(TransformerEncoderBuilder.from_kwargs(
        n_layers=1, n_heads=2, query_dimensions=4, value_dimensions=4,
        feed_forward_dimensions=8).get(), run_id="floats")
    with serve(make_app(tmp_path, [plain, features])) as url, httpx.Client(base_url=url) as c:
        ids = c.get(f"{CAPTURES}/input", params={"run": "ids"}).json()
        assert ids["tokens"] and not ids["text"] and "type token ids" in ids["message"]
        assert "[0, 9]" in ids["message"]
        floats = c.get(f"{CAPTURES}/input", params={"run": "floats"}).json()
        assert not floats["tokens"] and "features (N, L, 8)" in floats["message"]
        assert c.get(f"{CAPTURES}/input", params={"run": "x"}).status_code == 422


def test_a_capture_whose_client_hangs_up_is_not_kept(tmp_path):
    run = demo_run(ended=False)
    forwards: list[bool] = []
    run.model.register_forward_pre_hook(lambda m, args: forwards.append(m.training))
    stop = threading.Event()

    def train() -> None:  # a slow loop: one step every 1.5 s
        step = 0
        while not stop.wait(1.5):
            run.step(step)
            step += 1

    trainer = threading.Thread(target=train, daemon=True)
    trainer.start()
    try:
        with serve(make_app(tmp_path, [run])) as url, httpx.Client(base_url=url) as c:
            with pytest.raises(httpx.ReadTimeout):  # the page's Cancel: the request is dropped
                c.post(CAPTURES, json={"run": "demo", "text": "ABC"}, timeout=0.3)
            # The capture was queued: it runs at the next step, then is deleted.
            wait_until(lambda: False in forwards, 10, "the queued pass")
            time.sleep(1.0)
            assert c.get(CAPTURES).json()["total"] == 0
            kept = c.post(CAPTURES, json={"run": "demo", "text": "ABC"}, timeout=30)
            assert kept.status_code == 201 and c.get(CAPTURES).json()["total"] == 1
    finally:
        stop.set()
        trainer.join(10)
        run.close()


def test_a_gpt2_input_longer_than_its_positions_is_refused_before_any_pass(tmp_path):
    pytest.importorskip("transformers")
    from hf_support import bpe_tokenizer, tiny_gpt2

    from attnscope.training.run import Run

    tok = bpe_tokenizer()
    run = Run(tiny_gpt2(len(tok), positions=16), run_id="gpt2", tokenizer=tok)  # nobody steps
    assert run.layout.max_len == 16  # its learned position embedding's rows
    with serve(make_app(tmp_path, [run], CaptureLimits(timeout_s=30))) as url, \
            httpx.Client(base_url=url, timeout=60) as c:
        long = c.post(CAPTURES, json={"run": "gpt2", "text": "the cat sat on the mat. " * 6})
        assert long.status_code == 422, long.text
        assert "over the limit of 16 positions" in long.json()["detail"][0]["msg"]
    run.close()
