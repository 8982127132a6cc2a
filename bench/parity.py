"""Our attentions against fast-transformers' (the seed's) compiled CPU kernels.

For every attention both libraries have, the same random queries, keys and values
(N=1, H=4, E=D=64, float32) go through ours and the seed's inner attention, with
the seed's default hyperparameters; reported per type and length:

* forward time (no grad) and forward + backward time, medians of ``--repeats``
  rounds, each round timing ours then the seed's back to back; ratio ours / seed;
* for the deterministic attentions, the largest absolute output difference
  (the hashing ones draw their own random planes: timing only).

The seed is built from its git repository into ``--build-dir`` on first use
(``python setup.py build_ext --inplace``, CPU kernels only: ~5 minutes of two
cores; by default under the system temp dir); later runs reuse it. Both modules
run in eval mode (no dropout).

Figures are only meaningful on a quiet machine: run it when nothing else
competes for the cores (``--threads`` sets torch's intra-op threads, 2 by default).

Usage::

    python bench/parity.py --seed-git /work/.mirror/idiap+fast-transformers/repo \\
        [--lengths 1024 4096] [--types full linear] [--repeats 5] [--build-dir DIR]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transformer_core.attention as ours  # noqa: E402
import transformer_core.masking as our_masks  # noqa: E402

N, H, E = 1, 4, 64
# type -> (our class, seed class name, keyword arguments for both, causal, deterministic)
CASES: dict[str, tuple[type, str, dict, bool, bool]] = {
    "full": (ours.FullAttention, "FullAttention", {}, False, True),
    "linear": (ours.LinearAttention, "LinearAttention", {"query_dimensions": E}, False, True),
    "causal-linear": (ours.CausalLinearAttention, "CausalLinearAttention",
                      {"query_dimensions": E}, True, True),
    "local": (ours.LocalAttention, "LocalAttention", {"local_context": 64}, False, True),
    "exact-topk": (ours.ExactTopKAttention, "ExactTopKAttention", {"topk": 32}, False, True),
    "aft-simple": (ours.AFTSimpleAttention, "AFTSimpleAttention", {}, False, True),
    "clustered": (ours.ClusteredAttention, "ClusteredAttention", {"clusters": 100}, False,
                  False),
    "improved-clustered": (ours.ImprovedClusteredAttention, "ImprovedClusteredAttention",
                           {"clusters": 100}, False, False),
    "causal-improved-clustered": (ours.ImprovedClusteredCausalAttention,
                                  "ImprovedClusteredCausalAttention", {"clusters": 100}, True,
                                  False),
    "reformer": (ours.ReformerAttention, "ReformerAttention", {}, False, False),
}


def build_seed(seed_git: str, build_dir: Path) -> None:
    """Export the seed's source into ``build_dir`` and compile its CPU kernels there."""
    marker = build_dir / ".built"
    if marker.exists():
        return
    build_dir.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", f"--git-dir={seed_git}", "archive", "HEAD"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(build_dir, filter="data")
    # CPU kernels only: the seed's setup.py adds CUDA extensions whenever nvcc is on PATH
    path = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if not shutil.which("nvcc", path=d)]
    env = {**os.environ, "MAX_JOBS": "2", "PATH": os.pathsep.join(path)}
    print(f"building the seed's kernels in {build_dir} (minutes) ...", file=sys.stderr)
    subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=build_dir,
                   env=env, check=True, stdout=subprocess.DEVNULL)
    marker.write_text("ok\n")


def masks(library, L: int, causal: bool):
    """(attn_mask, query_lengths, key_lengths) of ``library``'s masking module."""
    attn = library.TriangularCausalMask(L) if causal else library.FullMask(L)
    lengths = library.LengthMask(torch.full((N,), L, dtype=torch.long))
    return attn, lengths, lengths


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def timers(attention, args) -> tuple[Callable[[], object], Callable[[], object]]:
    """(forward without grad, forward + backward) of ``attention(*args)``; args[:3] = q, k, v."""

    def forward():
        with torch.no_grad():
            attention(*args)

    def backward():
        leaves = [t.detach().requires_grad_() for t in args[:3]]
        attention(*leaves, *args[3:]).sum().backward()

    return forward, backward


def measure(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median ms of each of ``fns``, timed one after the other in every round."""
    for fn in fns:
        fn()  # warm-up: allocations, lazy initialisation
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, kept in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            kept.append((time.perf_counter() - start) * 1000)
    return [statistics.median(kept) for kept in times]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed-git", required=True)
    parser.add_argument("--build-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "attnscope-seed-build")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--types", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    build_seed(args.seed_git, args.build_dir.resolve())
    sys.path.insert(0, str(args.build_dir.resolve()))
    import fast_transformers.attention as seed
    import fast_transformers.masking as seed_masks

    print(f"torch {torch.__version__}, {args.threads} threads, N={N} H={H} E=D={E}, "
          f"median of {args.repeats}; figures need a quiet machine")
    print("| type | L | ours fwd ms | seed fwd ms | ratio | ours fwd+bwd ms | "
          "seed fwd+bwd ms | ratio | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.types:
        cls, seed_name, kwargs, causal, deterministic = CASES[name]
        mine = cls(**kwargs).eval()
        theirs = getattr(seed, seed_name)(**kwargs).eval()
        for L in args.lengths:
            torch.manual_seed(0)
            q, k, v = (torch.randn(N, L, H, E) for _ in range(3))
            our_args = (q, k, v, *masks(our_masks, L, causal))
            seed_args = (q, k, v, *masks(seed_masks, L, causal))
            diff = "-"
            if deterministic:
                with torch.no_grad():
                    diff = f"{(mine(*our_args) - theirs(*seed_args)).abs().max().item():.1e}"
            (o_fwd, o_bwd), (s_fwd, s_bwd) = zip(*[
                measure([mine_fn, seed_fn], args.repeats)
                for mine_fn, seed_fn in zip(timers(mine, our_args), timers(theirs, seed_args),
                                            strict=True)], strict=True)
            print(f"| {name} | {L} | {o_fwd:.1f} | {s_fwd:.1f} | {o_fwd / s_fwd:.2f} | "
                  f"{o_bwd:.1f} | {s_bwd:.1f} | {o_bwd / s_bwd:.2f} | {diff} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
