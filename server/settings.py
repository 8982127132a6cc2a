"""The server's one settings object (environment variables prefixed ``ATTNSCOPE_``).

>>> Settings(port=0).port
0
>>> Settings(max_fps=0)
Traceback (most recent call last):
...
pydantic_core._pydantic_core.ValidationError: 1 validation error for Settings
max_fps
  Input should be greater than 0 [type=greater_than, input_value=0, input_type=int]
...
"""

from __future__ import annotations

import secrets
from pathlib import Path

import platformdirs
from pydantic import Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Protocol ceilings (docs/protocol.md): settings may lower them, never raise them.
PROTOCOL_MAX_FPS = 60.0
PROTOCOL_MAX_SIDE = 1024
# Shorter tokens can be guessed online; token_urlsafe(32) gives 43 characters.
MIN_TOKEN_LENGTH = 16


def default_data_dir() -> Path:
    """Where captures and history live unless ``ATTNSCOPE_DATA_DIR`` says otherwise: the
    OS's per-user data folder (``~/.local/share/attnscope`` on Linux)."""
    return Path(platformdirs.user_data_dir("attnscope"))


class Settings(BaseSettings):
    """Created once at start, validated there, and passed down (``app.state.settings``)."""

    model_config = SettingsConfigDict(env_prefix="ATTNSCOPE_", extra="forbid")
    _token_generated: bool = PrivateAttr(False)

    # Loopback: a dashboard shows model internals, it is private unless asked otherwise.
    host: str = "127.0.0.1"
    # 8000: uvicorn's and the docs' default; 0 picks a free port.
    port: int = Field(8000, ge=0, le=65535)
    # Where captures and other persistent data live (the OS's per-user data folder).
    data_dir: Path = Field(default_factory=default_data_dir)
    # "auto": CUDA when there is a GPU, else the CPU (used by the demo run).
    device: str = "auto"
    # 64 KiB: a subscribe message is a few hundred bytes; anything bigger is a mistake.
    max_message_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)
    # 64 MiB: the largest frame a remote publisher (Dashboard.connect) may send, e.g.
    # 12 heads x 1024 x 1024 float16 is 24 MiB. Also the websocket layer's cap for
    # every socket; browsers' messages are still held to max_message_bytes above.
    max_publish_bytes: int = Field(64 * 1024 * 1024, ge=1024 * 1024, le=1024 * 1024 * 1024)
    # 64 concurrent websockets: a team's worth of browser tabs; each costs one sender task.
    max_subscribers: int = Field(64, ge=1, le=10_000)
    # 64 concurrent publishers (Dashboard.connect): a team's training jobs; each holds
    # up to max_publish_bytes in flight, so this also bounds their memory.
    max_publishers: int = Field(64, ge=1, le=10_000)
    # What a publisher's announce may describe (docs/security.md): 1024 layers and 1024
    # heads are far above any model in use; 65536 positions is a long-context model.
    # The layout is echoed to every viewer (GET /api/v1/runs), so it must stay small.
    max_remote_layers: int = Field(1024, ge=1, le=1_000_000)
    max_remote_heads: int = Field(1024, ge=1, le=1_000_000)
    max_remote_seq_len: int = Field(65536, ge=1, le=10_000_000)
    # 256 remote runs listed at most: past it the oldest ended (then idle) one is
    # forgotten (its recorded history stays); all of them live: a new run is refused.
    max_remote_runs: int = Field(256, ge=1, le=100_000)
    # HTTP connections (server/backend/connections.py): a request's headers must arrive within 10 s
    # of the connection (or of the previous response), a body may pause 30 s at most; a
    # slow client on a bad link sends its headers in well under a second.
    http_header_timeout_s: float = Field(10.0, gt=0, le=3600)
    http_idle_timeout_s: float = Field(30.0, gt=0, le=3600)
    # 128 open connections per client address, websockets included: a team's browsers
    # behind one NAT (6 HTTP connections and a websocket per tab) and its publishers.
    # Behind a reverse proxy every client has the proxy's address: raise it there.
    max_connections_per_client: int = Field(128, ge=1, le=1_000_000)
    # 256 MiB: the largest REST response built in memory (history data and frames);
    # a 200-snapshot history of 12 heads at L = S = 128 is 157 MiB of float32.
    max_response_bytes: int = Field(256 << 20, ge=1024)
    # Caps on what a subscriber may ask for (the protocol's own maxima by default).
    max_side: int = Field(PROTOCOL_MAX_SIDE, ge=4, le=PROTOCOL_MAX_SIDE)
    max_fps: float = Field(PROTOCOL_MAX_FPS, gt=0, le=PROTOCOL_MAX_FPS)
    # Off: on loopback compression costs the training process CPU and saves nothing.
    ws_compression: bool = False
    # torch intra-op threads for the demo run; None: one fewer than the CPU count (at
    # least 1), so the server's event loop keeps a core and OpenMP workers do not spin
    # against it (on 2 cores, 2 threads train the demo ~10x slower under load than 1).
    torch_threads: int | None = Field(None, ge=1, le=1024)
    # uvicorn's log level for the server's own access and error logs.
    log_level: str = "warning"
    # Dashboard.start serves from a process of its own: no thread of ours in the training
    # process (on a GPU any runnable Python thread there slows the kernel launches). False
    # where a child process cannot be started: the server then runs in threads of the
    # training process, as before (docs/architecture.md).
    server_process: bool = True

    # Captures (REST, docs/captures.md). 64 x 4096 tokens: far above a probe
    # batch, well below what would stall a training run for long.
    captures_max_batch: int = Field(64, ge=1)
    captures_max_length: int = Field(4096, ge=1)
    # 1 GiB per capture file: a 12-layer, 12-head L=512 attention capture is ~150 MiB.
    captures_max_capture_bytes: int = Field(1 << 30, ge=1)
    # 20 GiB of capture files in all (ATTNSCOPE_MAX_CAPTURE_BYTES): past it a new capture
    # is refused with 507 before its forward pass; captures are never deleted behind a
    # user's back (unlike history snapshots, which are thinned by design).
    max_capture_bytes: int = Field(20 << 30, ge=1)
    # 16 MiB request bodies: token lists and small feature tensors only.
    captures_max_body_bytes: int = Field(16 << 20, ge=1)
    # JSON downloads above 32 MiB are refused in favour of npz / safetensors.
    captures_max_json_bytes: int = Field(32 << 20, ge=0)
    # How long a capture waits for the training loop to reach a step boundary.
    captures_timeout_s: float = Field(60.0, gt=0)
    # Pinned inputs (server/backend/captures/pinned.py, docs/captures.md): a pinned text is
    # captured again every 50 steps by default: a forward pass in the training process,
    # cheap next to 50 training steps (forward, backward and optimizer each).
    pinned_every: int = Field(50, ge=1, le=1_000_000)
    # ... and never more often than every 5 s, however fast the run steps (a demo at
    # 100 steps/s would otherwise take two passes a second per pin).
    pinned_min_interval_s: float = Field(5.0, ge=0)
    # 100 captures kept per pin (older ones thinned, the first and newest kept): enough
    # to scrub through as the history's ~200 snapshots, bounded on disk.
    pinned_keep: int = Field(100, ge=3, le=10_000)
    # 8 pins per run: each costs a forward pass per capture.
    pinned_max_per_run: int = Field(8, ge=1, le=1000)

    # History (server/history, docs/history.md): on, so the page can scrub back. Off:
    # no listener at all while nobody watches (the model stays on the fused kernel).
    history_enabled: bool = True
    # A probe snapshot every 10 steps (one no-grad forward of 1 sample: < 1% of a step).
    history_every: int = Field(10, ge=1)
    # ~200 snapshots per run, older ones thinned logarithmically.
    history_max_snapshots: int = Field(200, ge=3)
    # 2 GiB of snapshot files over this server's own (local) runs; past it, other local
    # runs' oldest go first. Remote runs have the quotas below (docs/security.md).
    history_max_bytes: int = Field(2 << 30, ge=1)
    # Per run id, whatever sends it: 10 sessions (run starts), its oldest deleted first, and
    # 1 GiB of snapshots, statistics and metadata, its own oldest evicted first. A run's
    # data only ever evicts that run's own.
    history_max_run_sessions: int = Field(10, ge=1, le=10_000)
    history_max_run_bytes: int = Field(1 << 30, ge=1 << 20)
    # Remote runs whose history is kept (32 x 1 GiB at most on disk); a new one makes the
    # server forget the one whose newest session is the oldest, not one being recorded.
    history_max_remote_runs: int = Field(32, ge=1, le=100_000)
    # 64 KiB: a publisher's session metadata, and a snapshot's probe labels, as JSON.
    history_max_meta_bytes: int = Field(64 << 10, ge=1024, le=16 << 20)
    # Snapshots pooled to at most 256 x 256 per head (12 x 12 heads at L=1024: 19 MB
    # a snapshot, not 302 MB); the page's history frames are 128 px by default.
    history_snapshot_max_side: int = Field(256, ge=4, le=4096)
    # Per-step head statistics of long sequences over 128 query rows per head spread over
    # the sequence (each exact, without the L x S matrix: docs/statistics.md); 12 x 12
    # heads at L=8192 then fit the 3 % budget on a CPU at every step. 0: every row.
    history_stats_rows: int = Field(128, ge=0)
    # Deprecated (max_overhead below bounds the probe with everything else); when set,
    # probe passes alone may also take at most this share of training time.
    history_probe_budget: float | None = Field(None, gt=0, le=1)

    # Alerts (server/alerts, docs/statistics.md): rules over every recorded step's head
    # statistics; each alert is stored with the run's history, served at
    # /api/v1/runs/{id}/alerts, shown on the page and logged as one line.
    alert_enabled: bool = True
    # Normalised entropy below 0.02: every query on one key (the page's "collapsed");
    # heads holding a one-key role (previous-token, self, sink, induction) are exempt.
    alert_entropy_floor: float = Field(0.02, ge=0, le=1)
    # Falling by half of its highest value of the last 20 steps (from 0.1 up) is
    # collapse, not learning.
    alert_drop_fraction: float = Field(0.5, ge=0, le=1)
    alert_drop_steps: int = Field(20, ge=1)
    alert_drop_from: float = Field(0.1, ge=0, le=1)
    # Drops compare means over the last 5 steps (one sample's statistics are noisy).
    alert_smooth_steps: int = Field(5, ge=1)
    # A layer: the mean entropy of its heads without a one-key role below 0.05, or
    # falling by 40 % within alert_drop_steps.
    alert_layer_entropy_floor: float = Field(0.05, ge=0, le=1)
    alert_layer_drop_fraction: float = Field(0.4, ge=0, le=1)
    # A head going dead (95 % of the weight on the first token) or uniform (entropy 0.99).
    alert_dead_first_token: float = Field(0.95, ge=0, le=1)
    alert_uniform_entropy: float = Field(0.99, ge=0, le=1)
    # Drops, dead and uniform heads wait 100 steps: heads leave uniform attention fast at
    # the start of training, by design. NaN / Inf and the floors apply from step 0.
    alert_warmup_steps: int = Field(100, ge=0)
    # A JSON POST per burst of alerts ({"text": ..., "alerts": [...]}, Slack-compatible)
    # to this URL; none by default. A failed POST is not retried (docs/statistics.md).
    alert_webhook: str | None = None
    # A slow endpoint is given up after 5 s; it never holds up training (its own thread).
    alert_webhook_timeout_s: float = Field(5.0, gt=0, le=60)

    # The dashboard's cost budget (server/training/budget.py): its time in the training thread
    # plus its helper threads' CPU at most 3 % of training time, a slowdown nobody sees
    # in steps/s; past it the dashboard thins its own work (statistics cadence, snapshot
    # spacing, frame rate, view size) and says so on the page. 1: never thin.
    max_overhead: float = Field(0.03, gt=0, le=1)
    # While nobody watches a run (no page or client subscribed to it) only its history is
    # recorded, and that may cost at most 1 % (never more than max_overhead): left running
    # for days unwatched, the dashboard should be all but free; watching brings the rest
    # back within a few windows.
    idle_overhead: float = Field(0.01, gt=0, le=1)

    # Access token (server/backend/auth.py). None on loopback: no token needed. None on any other
    # bind: one is generated at start and printed in the URL (as Jupyter does).
    token: SecretStr | None = None
    # Websocket and state-changing REST origins accepted besides the server's own (e.g. a
    # reverse proxy's URL).
    allowed_origins: list[str] = Field(default_factory=list)
    # Host names accepted besides loopback names and the bound address (DNS rebinding:
    # docs/security.md), e.g. ["dash.example.org"]; ["*"] turns the check off. Off a
    # loopback bind the check is off unless this is set: the (required) token guards.
    allowed_hosts: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_token(self) -> Settings:
        token = None if self.token is None else self.token.get_secret_value()
        if token is None:
            if not self.is_loopback:
                self.token = SecretStr(secrets.token_urlsafe(32))
                self._token_generated = True
            return self
        if token == "":
            if not self.is_loopback:
                raise ValueError(f"token: an empty token is refused when bound to {self.host!r} "
                                 "(not loopback); set ATTNSCOPE_TOKEN, or unset it to have one "
                                 "generated")
            self.token = None
            return self
        if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
            raise ValueError(f"token: must be at least {MIN_TOKEN_LENGTH} characters without "
                             "spaces; make one with python -c 'import secrets; "
                             "print(secrets.token_urlsafe(32))'")
        return self

    @property
    def token_value(self) -> str | None:
        """The token in clear (None: no token required)."""
        return None if self.token is None else self.token.get_secret_value()

    @property
    def token_generated(self) -> bool:
        """True when the token was generated at start (so it must be printed for the user)."""
        return self._token_generated

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value == "auto" or value == "cpu" or value == "mps" or value.startswith("cuda"):
            return value
        raise ValueError(f"device must be 'auto', 'cpu', 'mps' or 'cuda[:N]', got {value!r}")

    @field_validator("alert_webhook")
    @classmethod
    def _check_webhook(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"alert_webhook must be an http:// or https:// URL, got {value!r}")
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        levels = ("critical", "error", "warning", "info", "debug", "trace")
        if value.lower() not in levels:
            raise ValueError(f"log_level must be one of {list(levels)}, got {value!r}")
        return value.lower()

    @property
    def is_loopback(self) -> bool:
        """True when bound to a loopback address only."""
        return self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127.")
