"""torchrun / DDP: rank 0 publishes by default; ``ranks="all"`` publishes every rank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from auth_support import BEARER, TOKEN
from stream_support import Served

from server.runs import RunRegistry

ROOT = Path(__file__).resolve().parents[2]


def _torchrun(url: str, run: str, ranks: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ATTNSCOPE_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "examples" / "train_remote.py"), "--url", url, "--run-id", run,
         "--steps", "20", "--ranks", ranks, "--device", "cpu", "--seq-len", "8"],
        env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("ranks, expected", [
    ("0", {"ddp": 20}),
    ("all", {"ddp/rank-0": 20, "ddp/rank-1": 20}),
])
def test_torchrun_two_ranks(ranks: str, expected: dict[str, int]) -> None:
    registry = RunRegistry()
    with Served(registry, token=TOKEN) as served:
        done = _torchrun(served.url, "ddp", ranks)
        assert done.returncode == 0, done.stderr[-3000:]
        runs = {r["id"]: r for r in served.http.get("/api/v1/runs", headers=BEARER).json()}
        assert set(runs) == set(expected)
        for run_id, steps in expected.items():
            assert runs[run_id]["status"] == "ended" and runs[run_id]["error"] is None
            assert runs[run_id]["model"]["layers"] == 1
            history = registry.get(run_id).history.to_dict()
            assert history["steps"][-1] == steps - 1
