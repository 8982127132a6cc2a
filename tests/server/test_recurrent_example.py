"""examples/recurrent_generation.py runs: trains, serves, generates token by token."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_recurrent_generation_example_runs_bounded():
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "recurrent_generation.py"), "--train-steps", "3",
         "--sequences", "2", "--delay", "0", "--digits", "4", "--port", "0"],
        capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "attnscope dashboard: http://127.0.0.1:" in done.stdout
    answers = [line.split("root: ")[1] for line in done.stderr.splitlines()
               if line.endswith(" right)")]
    assert [a.endswith(f"of {i + 1} right)") for i, a in enumerate(answers)] == [True, True]
    for line in answers:  # "1234 | 4321 (n of m right)": 4 digits read, 4 written
        digits, answer = line.split(" (")[0].split(" | ")
        assert len(digits) == 4 and len(answer) == 4
