"""Dockerfile and docker-compose.yml: parsed and checked (no Docker engine here), and the
image's command run with this checkout's environment: it serves health, and needs the token."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
TOKEN_ENV = "${ATTNSCOPE_TOKEN:?set ATTNSCOPE_TOKEN}"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    text = re.sub(r"<<'PY'.*?\nPY\n", "<<'PY'\n", text, flags=re.S)  # heredoc bodies
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def exec_form(instruction: str) -> list[str]:
    args = [a for i, a in instructions() if i == instruction][-1]
    args = args.removeprefix("CMD").strip()
    return json.loads(args)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_dockerfile_is_multi_stage_cpu_by_default_non_root() -> None:
    ins = instructions()
    stages = [a for i, a in ins if i == "FROM"]
    assert len(stages) >= 2 and any(" AS " in s.upper() for s in stages)
    args = dict(a.split("=", 1) for i, a in ins if i == "ARG" and "=" in a)
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert args["TORCH_SPEC"].startswith("torch")
    users = [a for i, a in ins if i == "USER"]
    assert users and users[-1] not in ("root", "0")
    # Dependencies are installed in a layer before the code is copied.
    order = [(i, a) for i, a in ins if i in ("RUN", "COPY")]
    deps = next(n for n, (i, a) in enumerate(order) if i == "RUN" and "constraints.txt" in a)
    code = next(n for n, (i, a) in enumerate(order) if i == "COPY" and a.startswith("server"))
    assert deps < code


def test_dockerfile_installs_the_built_wheel_not_the_checkout() -> None:
    # The image runs what a user's `pip install attnscope-*.whl` gives (the page is package
    # data): an editable install would find frontend/ beside the code and hide a wheel
    # without it.
    runs = " ".join(a for i, a in instructions() if i == "RUN")
    assert "pip wheel" in runs and ".whl" in runs
    assert " -e " not in runs and "--editable" not in runs
    runtime = DOCKERFILE[DOCKERFILE.upper().index(" AS RUNTIME"):]
    assert "COPY --from=build /app " not in runtime  # no source tree beside the venv


def test_dockerfile_copies_only_what_exists() -> None:
    for i, a in instructions():
        if i == "COPY" and not a.startswith("--from"):
            for src in a.split()[:-1]:
                assert (ROOT / src).exists(), src


def test_dockerfile_healthcheck_and_command() -> None:
    health = [a for i, a in instructions() if i == "HEALTHCHECK"]
    assert health and "/api/v1/health" in health[0]
    assert exec_form("CMD")[:2] == ["attnscope", "serve"]
    assert "0.0.0.0" in exec_form("CMD")


def test_compose_services(compose: dict) -> None:
    dashboard, trainer = compose["services"]["dashboard"], compose["services"]["trainer"]
    assert "8000:8000" in dashboard["ports"]
    assert dashboard["environment"]["ATTNSCOPE_TOKEN"] == TOKEN_ENV
    assert trainer["environment"]["ATTNSCOPE_TOKEN"] == TOKEN_ENV
    volume, _, target = dashboard["volumes"][0].partition(":")
    assert volume in compose["volumes"] and target == dashboard["environment"]["ATTNSCOPE_DATA_DIR"]
    assert "/api/v1/health" in " ".join(dashboard["healthcheck"]["test"])
    assert trainer["depends_on"]["dashboard"]["condition"] == "service_healthy"
    script = trainer["command"][1]
    assert (ROOT / script).is_file()
    assert "http://dashboard:8000" in trainer["command"]
    assert "devices:" in (ROOT / "docker-compose.yml").read_text()  # the GPU reservation hint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_image_command_serves_health_and_needs_the_token(tmp_path: Path, compose: dict) -> None:
    port = _free_port()
    token = "docker-test-token-0123456789abcdef"
    command = exec_form("CMD")
    # On this shared machine we bind loopback, not the image's 0.0.0.0; ATTNSCOPE_TOKEN
    # makes the token required all the same, as it is in the container.
    command = [("127.0.0.1" if a == "0.0.0.0" else a) for a in command]
    exe = Path(sys.executable).parent / command[0]
    env = {**os.environ, "ATTNSCOPE_TOKEN": token, "ATTNSCOPE_PORT": str(port),
           "ATTNSCOPE_DATA_DIR": str(tmp_path)}
    proc = subprocess.Popen([str(exe), *command[1:]], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/api/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        health = [a for i, a in instructions() if i == "HEALTHCHECK"][0]
        check = json.loads(health[health.index("CMD") + 3:].strip())
        check = [a.replace("8000", str(port)) for a in check]
        assert subprocess.run(check, env=env, timeout=10).returncode == 0
        compose_check = [a.replace("8000", str(port))
                         for a in compose["services"]["dashboard"]["healthcheck"]["test"][1:]]
        assert subprocess.run(compose_check, env=env, timeout=10).returncode == 0
        assert httpx.get(url + "/api/v1/runs", timeout=5).status_code == 401
        authed = httpx.get(url + "/api/v1/runs", timeout=5,
                           headers={"Authorization": f"Bearer {token}"})
        assert authed.status_code == 200
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
    # The token comes from the container's environment: it must not reach its logs.
    assert token not in out and "token: ATTNSCOPE_TOKEN" in out, shlex.quote(out)
