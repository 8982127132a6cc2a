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

from pathlib import Path

import platformdirs
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Protocol ceilings (docs/protocol.md): settings may lower them, never raise them.
PROTOCOL_MAX_FPS = 60.0
PROTOCOL_MAX_SIDE = 1024


class Settings(BaseSettings):
    """Created once at start, validated there, and passed down (``app.state.settings``)."""

    model_config = SettingsConfigDict(env_prefix="ATTNSCOPE_", extra="forbid")

    # Loopback: a dashboard shows model internals, it is private unless asked otherwise.
    host: str = "127.0.0.1"
    # 8000: uvicorn's and the docs' default; 0 picks a free port.
    port: int = Field(8000, ge=0, le=65535)
    # Where captures and other persistent data live (the OS's per-user data folder).
    data_dir: Path = Field(default_factory=lambda: Path(platformdirs.user_data_dir("attnscope")))
    # "auto": CUDA when there is a GPU, else the CPU (used by the demo run).
    device: str = "auto"
    # 64 KiB: a subscribe message is a few hundred bytes; anything bigger is a mistake.
    max_message_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)
    # 64 concurrent websockets: a team's worth of browser tabs; each costs one sender task.
    max_subscribers: int = Field(64, ge=1, le=10_000)
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
