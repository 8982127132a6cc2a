"""torchrun / DDP: rank 0 publishes by default; ``ranks="all"`` publishes every rank."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from auth_support import BEARER, TOKEN
from stream_support import Served

from attnscope.training.run import RunRegistry

ROOT = Path(__file__).resolve().parents[2]


def _torchrun(url: str, run: str, ranks: str, steps: int, sleep: float) -> subprocess.Popen:
    env = {**os.environ, "ATTNSCOPE_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "examples" / "train_remote.py"), "--url", url, "--run-id", run,
         "--steps", str(steps), "--ranks", ranks, "--device", "cpu", "--seq-len", "8",
         "--sleep", str(sleep)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _capture_while_training(served: Served, registry: RunRegistry, run_id: str) -> None:
    """A capture of a DDP run: only the publishing rank runs the forward pass."""
    deadline = time.monotonic() + 120
    while run_id not in registry.ids() or registry.get(run_id).step_index is None:
        assert time.monotonic() < deadline, "the run never published a step"
        time.sleep(0.05)
    response = served.http.post("/api/v1/captures", headers=BEARER, json={
        "run": run_id, "text": "ABCDEFGH", "kinds": ["attention"]})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["labels"] == [list("ABCDEFGH")]
    assert body["tensors"]["attention.0"]["shape"] == [1, 4, 8, 8]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("ranks, expected, capture", [
    ("0", {"ddp": 60}, True),
    ("all", {"ddp/rank-0": 20, "ddp/rank-1": 20}, False),
])
def test_torchrun_two_ranks(ranks: str, expected: dict[str, int], capture: bool) -> None:
    registry = RunRegistry()
    with Served(registry, token=TOKEN) as served:
        steps = max(expected.values())
        proc = _torchrun(served.url, "ddp", ranks, steps, 0.05 if capture else 0.0)
        try:
            if capture:
                _capture_while_training(served, registry, "ddp")
            _, stderr = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 0, stderr[-3000:]
        runs = {r["id"]: r for r in served.http.get("/api/v1/runs", headers=BEARER).json()}
        assert set(runs) == set(expected)
        for run_id, steps in expected.items():
            assert runs[run_id]["status"] == "ended" and runs[run_id]["error"] is None
            assert runs[run_id]["model"]["layers"] == 1
            history = registry.get(run_id).history.to_dict()
            assert history["steps"][-1] == steps - 1
