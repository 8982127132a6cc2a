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
    # Pinned inputs (server/captures/pinned.py, docs/captures.md): a pinned text is
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
    # 2 GiB of snapshot files over all runs; past it, other runs' oldest go first.
    history_max_bytes: int = Field(2 << 30, ge=1)
    # Snapshots pooled to at most 256 x 256 per head (12 x 12 heads at L=1024: 19 MB
    # a snapshot, not 302 MB); the page's history frames are 128 px by default.
    history_snapshot_max_side: int = Field(256, ge=4, le=4096)
    # Deprecated (max_overhead below bounds the probe with everything else); when set,
    # probe passes alone may also take at most this share of training time.
    history_probe_budget: float | None = Field(None, gt=0, le=1)

    # The dashboard's cost budget (server/budget.py): its time in the training thread
    # plus its helper threads' CPU at most 3 % of training time, a slowdown nobody sees
    # in steps/s; past it the dashboard thins its own work (statistics cadence, snapshot
    # spacing, frame rate, view size) and says so on the page. 1: never thin.
    max_overhead: float = Field(0.03, gt=0, le=1)

    # Access token (server/auth.py). None on loopback: no token needed. None on any other
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
