"""Alert rules on crafted statistics (each episode fires once and re-arms), their book
(stored, logged, not raised twice after a restart), the REST route and the webhook
against a local test server (slow and failing endpoints never hold up the caller)."""

from __future__ import annotations

import http.server
import json
import logging
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from attnscope.backend.alerts.book import AlertBook
from attnscope.backend.alerts.rules import AlertRules, AlertTracker
from attnscope.backend.alerts.webhook import MAX_LINES, Webhook
from attnscope.backend.app import create_app
from attnscope.backend.history.store import HistoryStore, StatRow
from attnscope.core.history_items import StoredStats
from attnscope.core.stats import HEAD_STATISTICS
from attnscope.settings import Settings

R = len(HEAD_STATISTICS)
I = {name: i for i, name in enumerate(HEAD_STATISTICS)}  # noqa: E741
META = {"layers": 1, "stat_names": list(HEAD_STATISTICS)}


def row(K: int = 1, H: int = 2, **values: list[float] | float) -> np.ndarray:
    """A (K, R, H) stats row: entropy 0.8 and all other values 0 unless given (a value
    per head, or one for all)."""
    out = np.zeros((K, R, H), np.float32)
    out[:, I["entropy"]] = 0.8
    for name, v in values.items():
        out[:, I[name]] = v
    return out


def fired(tracker: AlertTracker, step: int, stats: np.ndarray) -> list[tuple]:
    return [(a.rule, a.layer, a.head) for a in tracker.observe(step, stats)]


def test_a_floor_fires_once_per_episode_and_rearms_above_twice_the_floor():
    t = AlertTracker(AlertRules(warmup_steps=0, layer_entropy_floor=0.0,
                                layer_drop_fraction=1.0, smooth_steps=1))
    assert fired(t, 0, row()) == []
    assert fired(t, 1, row(entropy=[0.01, 0.8])) == [("entropy_floor", 0, 0),
                                                      ("entropy_drop", 0, 0)]
    for step in range(2, 30):  # stays collapsed: no flood
        assert fired(t, step, row(entropy=[0.01, 0.8])) == []
    assert fired(t, 30, row(entropy=[0.03, 0.8])) == []  # above the floor, below the re-arm
    assert fired(t, 31, row(entropy=[0.01, 0.8])) == []
    assert fired(t, 32, row(entropy=[0.5, 0.8])) == []  # re-armed
    assert fired(t, 33, row(entropy=[0.01, 0.8])) == [("entropy_floor", 0, 0),
                                                       ("entropy_drop", 0, 0)]


def test_a_head_with_a_one_key_role_may_sit_on_one_key():
    t = AlertTracker(AlertRules(warmup_steps=0))
    t.observe(0, row(entropy=0.01, previous_token=0.9))
    assert fired(t, 1, row(entropy=0.01, previous_token=0.9)) == []


def test_entropy_falling_by_half_within_n_steps_after_the_warmup():
    rules = AlertRules(warmup_steps=10, drop_steps=5, drop_fraction=0.5,
                       layer_drop_fraction=1.0, smooth_steps=1)
    t = AlertTracker(rules)
    assert fired(t, 0, row(entropy=0.9)) == []
    assert fired(t, 1, row(entropy=0.3)) == []  # in the warm-up: heads leave uniform fast
    for step in range(2, 12):
        assert fired(t, step, row(entropy=0.3)) == []
    assert fired(t, 12, row(entropy=0.2)) == []  # a third down: learning
    assert fired(t, 13, row(entropy=0.14)) == [("entropy_drop", 0, 0), ("entropy_drop", 0, 1)]
    got = t.observe(14, row(entropy=0.14))
    assert got == []
    # slow decline (over more than n steps) never fires
    t2 = AlertTracker(rules)
    for step, e in enumerate(np.linspace(0.9, 0.1, 60)):
        assert fired(t2, step, row(entropy=float(e))) == []


def test_drops_compare_means_so_a_noisy_statistic_does_not_fire():
    t = AlertTracker(AlertRules(warmup_steps=0, layer_drop_fraction=1.0))  # 5-step means
    for step in range(60):  # one sample's entropy jumping by half from step to step
        assert fired(t, step, row(entropy=0.3 if step % 2 else 0.13)) == []
    fell = [fired(t, step, row(entropy=0.05)) for step in range(60, 66)]
    assert fell[:2] == [[], []] and fell[2] == [("entropy_drop", 0, 0), ("entropy_drop", 0, 1)]


def test_a_layer_collapses_when_its_heads_fall_together():
    t = AlertTracker(AlertRules(warmup_steps=0, drop_fraction=1.0, entropy_floor=0.0,
                                smooth_steps=1))
    t.observe(0, row(K=2, H=4, entropy=0.8))
    stats = row(K=2, H=4, entropy=0.8)
    stats[1, I["entropy"]] = [0.4, 0.4, 0.45, 0.5]  # layer 1 falls 45 %: each head < 50 %
    assert fired(t, 1, stats) == [("layer_entropy_drop", 1, None)]
    stats[1, I["entropy"]] = 0.03
    assert fired(t, 2, stats) == [("layer_entropy_floor", 1, None)]


def test_nan_fires_from_the_first_step_and_again_after_recovering():
    t = AlertTracker(AlertRules())  # default warm-up of 100 steps: NaN does not wait
    alerts = t.observe(0, row(nan=[0.0, 3.0], entropy=[0.8, float("nan")]))
    assert [(a.rule, a.head, a.severity) for a in alerts] == [("nonfinite", 1, "critical")]
    assert alerts[0].values == {"nan": 3.0, "inf": 0.0} and "3 NaN" in alerts[0].text
    assert fired(t, 1, row(nan=[0.0, 3.0], entropy=[0.8, float("nan")])) == []
    assert fired(t, 2, row()) == []
    assert fired(t, 3, row(inf=[1.0, 0.0])) == [("nonfinite", 0, 0)]


def test_dead_and_uniform_fire_on_a_change_only():
    t = AlertTracker(AlertRules(warmup_steps=0, layer_drop_fraction=1.0))
    # uniform at initialisation: not an alert
    assert fired(t, 0, row(entropy=0.995, first_token=[0.04, 0.04])) == []
    assert fired(t, 1, row(entropy=0.7)) == []
    assert fired(t, 2, row(entropy=[0.995, 0.7])) == [("uniform", 0, 0)]
    assert fired(t, 3, row(entropy=0.7, first_token=[0.0, 0.97])) == [("dead", 0, 1)]
    assert fired(t, 4, row(entropy=0.7, first_token=[0.0, 0.97])) == []


def test_alert_messages_are_plain_json_and_name_what_happened():
    t = AlertTracker(AlertRules(warmup_steps=0))
    t.observe(0, row())
    alert = t.observe(5, row(entropy=[0.01, 0.8]))[0]  # the floor's, first
    message = alert.to_message("lm/run", "s1", 7)
    assert json.loads(json.dumps(message)) == message
    assert message["id"] == "s1:7" and message["step"] == 5 and message["layer"] == 0
    assert message["head"] == 0 and message["rule"] == "entropy_floor"
    assert message["values"] == {"entropy": pytest.approx(0.01), "floor": 0.02}
    assert message["text"] == "step 5: L0 H0 entropy collapsed to 0.010 (floor 0.02)"


def test_rules_are_validated_with_the_field_named():
    with pytest.raises(ValueError, match="alert_drop_fraction must be a number in"):
        AlertRules(drop_fraction=2.0).validate()
    with pytest.raises(ValueError, match="alert_drop_steps must be an int >= 1"):
        AlertRules(drop_steps=0).validate()
    rules = AlertRules.from_settings(Settings(alert_entropy_floor=0.1, alert_warmup_steps=3))
    assert rules.entropy_floor == 0.1 and rules.warmup_steps == 3


def rows(*entropies: float, start: int = 0) -> list[StatRow]:
    return [StatRow(start + i, 0.0, {}, row(entropy=[e, 0.8])) for i, e in enumerate(entropies)]


def test_the_book_stores_logs_and_tells_listeners_and_a_restart_does_not_repeat(tmp_path,
                                                                               caplog):
    with HistoryStore(tmp_path) as store:
        session = store.new_session("lm", None, META).id
        quiet_layers = AlertRules(warmup_steps=0, layer_drop_fraction=1.0, smooth_steps=1)
        book = AlertBook(store, quiet_layers)
        heard = []
        book.listeners.append(heard.append)
        for r in rows(0.8, 0.7):
            store.add_stats(session, [r])
            assert book.rows(session, [r]) == []
        r = rows(0.01, start=2)
        store.add_stats(session, r)
        with caplog.at_level(logging.WARNING, logger="attnscope.backend.alerts.book"):
            raised = book.rows(session, r)
        assert [m["rule"] for m in raised] == ["entropy_floor", "entropy_drop"]
        assert heard == raised and [m["seq"] for m in raised] == [0, 1]
        assert store.alerts(session) == raised and book.count(session) == 2
        assert "attnscope alert (run lm): step 2: L0 H0 entropy collapsed" in caplog.text
        # the server restarts: a new book replays the stored rows and stays quiet
        again = AlertBook(store, quiet_layers)
        r = rows(0.01, start=3)
        store.add_stats(session, r)
        assert again.rows(session, r) == []
        r = rows(0.9, 0.01, start=4)
        store.add_stats(session, r)
        assert [m["seq"] for m in again.rows(session, r)] == [2, 3]
        assert store.alerts(session, start=5) == store.alerts(session)[2:]
        assert store.alerts(session, limit=1)[0]["seq"] == 3


def test_rest_alerts_and_the_heads_answer(tmp_path):
    app = create_app(Settings(data_dir=tmp_path, alert_warmup_steps=0,
                              alert_layer_drop_fraction=1.0, alert_smooth_steps=1))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        service = app.state.history
        session = service.store.new_session("lm", None, {**META, "heads": 2}).id
        service.submit(StoredStats(session, rows(0.8, 0.8, 0.01, 0.01)))
        assert service.flush()
        body = client.get("/api/v1/runs/lm/alerts", params={"session": session}).json()
        assert [a["rule"] for a in body["alerts"]] == ["entropy_floor", "entropy_drop"]
        assert body["alerts"][0]["step"] == 2 and body["rules"]["entropy_floor"] == 0.02
        assert client.get("/api/v1/runs/lm/alerts",
                          params={"session": session, "to": 1}).json()["alerts"] == []
        heads = client.get("/api/v1/runs/lm/heads", params={"session": session}).json()
        assert [a["id"] for a in heads["alerts"]] == [f"{session}:0", f"{session}:1"]
        missing = client.get("/api/v1/runs/nobody/alerts")
        assert missing.status_code == 404
        # every head's per-step entropy, spread over at most `points` steps
        curves = client.get("/api/v1/runs/lm/heads", params={
            "session": session, "curve": "entropy", "points": 3}).json()
        assert curves["curve_stat"] == "entropy" and curves["curve_steps"] == [0, 2, 3]
        collapsing = [pytest.approx(v) for v in (0.8, 0.01, 0.01)]
        assert [h["curve"] for h in curves["heads"]] == [collapsing, [pytest.approx(0.8)] * 3]
        bad = client.get("/api/v1/runs/lm/heads", params={"session": session, "curve": "x"})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "curve"]


# -- the webhook ---------------------------------------------------------------------------


class Endpoint(http.server.ThreadingHTTPServer):
    """A local webhook receiver: ``mode`` ok / slow (waits for ``release``) / fail (500)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.bodies: list[dict] = []
        self.release = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.bodies.append(body)
                if outer.mode == "slow":
                    outer.release.wait(10)
                code = 500 if outer.mode == "fail" else 200
                try:
                    self.send_response(code)
                    self.end_headers()
                except OSError:  # the client gave up (timeout)
                    pass

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server_address[1]}/hook"


@pytest.fixture
def endpoint(request) -> Iterator[Endpoint]:
    server = Endpoint(request.param)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


def message(i: int) -> dict:
    return {"type": "alert", "run": "lm", "step": i, "text": f"step {i}: L0 H0 went uniform"}


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.mark.parametrize("endpoint", ["ok"], indirect=True)
def test_a_burst_of_alerts_is_one_slack_compatible_post(endpoint):
    hook = Webhook(endpoint.url, min_interval_s=0.2)
    try:
        for i in range(MAX_LINES + 3):
            assert hook.submit(message(i))
        assert wait_for(lambda: hook.sent == MAX_LINES + 3)
    finally:
        hook.close()
    assert len(endpoint.bodies) == 1
    body = endpoint.bodies[0]
    assert isinstance(body["text"], str) and len(body["alerts"]) == MAX_LINES + 3
    assert body["text"].splitlines()[0] == "attnscope alert on run lm: step 0: L0 H0 went uniform"
    assert body["text"].endswith("... and 3 more alerts")


@pytest.mark.parametrize("endpoint", ["slow"], indirect=True)
def test_a_slow_endpoint_never_holds_up_the_caller_and_is_given_up(endpoint):
    hook = Webhook(endpoint.url, timeout_s=0.5, min_interval_s=0.05, backoff_s=30)
    try:
        hook.submit(message(0))
        assert wait_for(lambda: len(endpoint.bodies) == 1)  # the POST hangs in the endpoint
        # a training loop keeps submitting while it hangs: every call returns at once
        # (the endpoint is still holding the first request when the loop is done)
        for i in range(1, 2000):
            hook.submit(message(i))
        assert not endpoint.release.is_set() and len(endpoint.bodies) == 1
        assert wait_for(lambda: hook.failed == 1)  # timed out, not retried
        assert hook.dropped > 0  # the rest: the queue was full, or during the back-off
        assert hook.sent == 0 and len(endpoint.bodies) == 1
    finally:
        endpoint.release.set()
        hook.close()


@pytest.mark.parametrize("endpoint", ["fail"], indirect=True)
def test_a_failing_endpoint_gets_one_attempt_per_backoff(endpoint, caplog):
    hook = Webhook(endpoint.url, min_interval_s=0.05, backoff_s=30)
    try:
        with caplog.at_level(logging.WARNING, logger="attnscope.backend.alerts.webhook"):
            hook.submit(message(0))
            assert wait_for(lambda: hook.failed == 1)
            for i in range(1, 20):
                hook.submit(message(i))
                time.sleep(0.01)
            assert wait_for(lambda: hook.dropped == 19)
        assert len(endpoint.bodies) == 1  # no retry storm
        assert caplog.text.count("alert webhook") == 1
    finally:
        hook.close()


def test_an_unreachable_endpoint_fails_quietly():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hook = Webhook(f"http://127.0.0.1:{port}/", timeout_s=0.5, min_interval_s=0.01)
    try:
        assert hook.submit(message(0))
        assert wait_for(lambda: hook.failed == 1)
    finally:
        hook.close()
    with pytest.raises(ValueError, match="alert_webhook: expected an http"):
        Webhook("ftp://example.org")
