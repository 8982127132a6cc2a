"""Cost of the head-role scores next to the head statistics they extend.

Where statistics run (the history writer thread every step, the stream's event loop
per frame), one layer's sample-0 attention (H, L, S) float16 on the CPU becomes its
head statistics. This times ``head_stats`` alone (the five statistics before roles)
against ``head_statistics`` (those plus the six pattern scores the roles need), per
layer, and the induction probe's ``repeat_scores`` (once per snapshot, not per step).

Usage: .venv/bin/python bench/roles.py [--repeats 200]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time

import torch

from attnscope.core.roles import repeat_scores
from attnscope.core.stats import head_statistics, head_stats

log = logging.getLogger(__name__)


def causal_attention(heads: int, length: int) -> torch.Tensor:
    """Random causal row-softmax matrices (H, L, L) in float16, as the writer sees them."""
    logits = torch.randn(heads, length, length) * 2
    mask = torch.ones(length, length, dtype=torch.bool).tril()
    return logits.masked_fill(~mask, float("-inf")).softmax(-1).half()


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    log.info("%-16s %12s %14s %10s %12s", "H x L", "stats (ms)", "+roles (ms)", "roles x",
             "repeat (ms)")
    for heads, length in ((4, 32), (12, 128), (12, 512)):
        p = causal_attention(heads, length)
        valid = torch.arange(1, length + 1)
        base = timed(lambda p=p, v=valid: head_stats(p, v), args.repeats)
        full = timed(lambda p=p, v=valid: head_statistics(p, v), args.repeats)
        rep = timed(lambda p=p, n=length: repeat_scores(p, n // 2), args.repeats)
        log.info("%-16s %12.3f %14.3f %10.2f %12.3f", f"{heads} x {length}", base * 1e3,
                 full * 1e3, full / base, rep * 1e3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
