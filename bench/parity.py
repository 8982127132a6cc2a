"""Our attentions against fast-transformers' (the seed's) compiled CPU kernels.

For every attention both libraries have, the same random queries, keys and values
(N=1, H=4, E=D=64, float32) go through ours and the seed's inner attention, with
the seed's default hyperparameters; reported per type and length:

* forward time (no grad) and forward + backward time, medians of ``--repeats``
  rounds, each round timing ours then the seed's back to back; ratio ours / seed;
* for the deterministic attentions, the largest absolute output difference
  (the hashing ones draw their own random planes: timing only);
* peak memory of forward and of forward + backward, ours / seed, in MiB: each
  measured in a fresh child process (this script with ``--memory-child``) that
  imports both libraries, makes the inputs, runs the case once at L=128 (lazy
  initialisation: thread pools, kernels' buffers), resets its peak resident set
  size to the current one (``5`` into ``/proc/self/clear_refs``), reads the
  resident size (``VmRSS`` in ``/proc/self/status``), calls the case once at full
  length and reads the peak (``VmHWM``; ``getrusage``'s ``ru_maxrss`` cannot be
  reset and keeps the parent's peak across ``exec``). The figure is the
  rise of the peak above the resident size before the call: memory the call held
  at its busiest moment (activations, autograd's saved tensors, gradients,
  temporaries), whichever allocator (torch's or the seed's C++) took it. It is
  Linux-only, rounded to pages, and memory the allocator kept from the warm-up
  and reused is not counted; a figure marked ``<=`` is a bound (the peak could
  not be reset and the call stayed below an earlier one). ``--no-memory`` skips
  the columns (a child process per case is slow).

The seed is built from its git repository into ``--build-dir`` on first use
(``python setup.py build_ext --inplace``, CPU kernels only: ~5 minutes of two
cores; by default under the system temp dir); later runs reuse it. Both modules
run in eval mode (no dropout).

Figures are only meaningful on a quiet machine: run it when nothing else
competes for the cores (``--threads`` sets torch's intra-op threads, 2 by default).

Usage::

    python bench/parity.py --seed-git /work/.mirror/idiap+fast-transformers/repo \\
        [--lengths 1024 4096] [--types full linear] [--repeats 5] [--build-dir DIR] \\
        [--no-memory]
"""

from __future__ import annotations

import argparse
import io
import logging
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
WARM_UP_LENGTH = 128  # the seed's clustering needs at least its 100 clusters of queries
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


def load_seed(seed_git: str, build_dir: Path):
    """The seed's (attention, masking) modules, built on first use."""
    build_seed(seed_git, build_dir.resolve())
    sys.path.insert(0, str(build_dir.resolve()))
    import fast_transformers.attention as seed
    import fast_transformers.masking as seed_masks

    return seed, seed_masks


def case(name: str, L: int, library, library_masks, ours_: bool):
    """(module, call arguments) of attention type ``name`` at length L in one library;
    the same seeded inputs for both."""
    cls, seed_name, kwargs, causal, _ = CASES[name]
    module = (cls if ours_ else getattr(library, seed_name))(**kwargs).eval()
    torch.manual_seed(0)
    q, k, v = (torch.randn(N, L, H, E) for _ in range(3))
    return module, (q, k, v, *masks(library_masks, L, causal))


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


def status_kib(field: str) -> int:
    """A KiB field of /proc/self/status (Linux): VmRSS (resident now), VmHWM (its peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise ValueError(f"field: {field!r} is not in /proc/self/status")


def memory_child(args, which: str, mode: str) -> str:
    """In a fresh process: the peak memory (MiB) of one call of the case (see the
    module docstring), printed as ``MiB`` or ``<=MiB``."""
    seed = load_seed(args.seed_git, args.build_dir)  # both loaded, as in the parent
    library, library_masks = (ours, our_masks) if which == "ours" else seed
    name, L = args.types[0], args.lengths[0]
    small = timers(*case(name, WARM_UP_LENGTH, library, library_masks, which == "ours"))
    full = timers(*case(name, L, library, library_masks, which == "ours"))
    index = 0 if mode == "fwd" else 1
    small[index]()  # lazy initialisation, at a length too short to matter
    try:  # "5" resets the peak (VmHWM) to the resident size now (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        logging.getLogger(__name__).warning("cannot reset the peak: figures are bounds")
    before, before_peak = status_kib("VmRSS"), status_kib("VmHWM")
    full[index]()
    peak = status_kib("VmHWM")
    bound = "<=" if peak == before_peak > before else ""
    return f"{bound}{(peak - before) / 1024:.0f}"


def peak_mib(args, name: str, L: int, which: str, mode: str) -> str:
    """``memory_child`` run in a child process of this script."""
    command = [sys.executable, __file__, "--seed-git", args.seed_git, "--build-dir",
               str(args.build_dir), "--types", name, "--lengths", str(L), "--threads",
               str(args.threads), "--memory-child", which, mode]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return done.stdout.strip().splitlines()[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed-git", required=True)
    parser.add_argument("--build-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "attnscope-seed-build")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--types", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the peak-memory columns (a child process per case)")
    parser.add_argument("--memory-child", nargs=2, metavar=("LIBRARY", "MODE"),
                        choices=["ours", "seed", "fwd", "bwd"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(memory_child(args, *args.memory_child))
        return 0
    seed, seed_masks = load_seed(args.seed_git, args.build_dir)

    print(f"torch {torch.__version__}, {args.threads} threads, N={N} H={H} E=D={E}, "
          f"median of {args.repeats}; figures need a quiet machine")
    print("| type | L | ours fwd ms | seed fwd ms | ratio | ours fwd+bwd ms | "
          "seed fwd+bwd ms | ratio | max abs diff | fwd peak MiB ours / seed | "
          "fwd+bwd peak MiB ours / seed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.types:
        deterministic = CASES[name][4]
        for L in args.lengths:
            mine, our_args = case(name, L, ours, our_masks, True)
            theirs, seed_args = case(name, L, seed, seed_masks, False)
            diff = "-"
            if deterministic:
                with torch.no_grad():
                    diff = f"{(mine(*our_args) - theirs(*seed_args)).abs().max().item():.1e}"
            (o_fwd, o_bwd), (s_fwd, s_bwd) = zip(*[
                measure([mine_fn, seed_fn], args.repeats)
                for mine_fn, seed_fn in zip(timers(mine, our_args), timers(theirs, seed_args),
                                            strict=True)], strict=True)
            memory = ["-", "-"]
            if not args.no_memory:
                memory = [" / ".join(peak_mib(args, name, L, which, mode)
                                     for which in ("ours", "seed")) for mode in ("fwd", "bwd")]
            print(f"| {name} | {L} | {o_fwd:.1f} | {s_fwd:.1f} | {o_fwd / s_fwd:.2f} | "
                  f"{o_bwd:.1f} | {s_bwd:.1f} | {o_bwd / s_bwd:.2f} | {diff} | "
                  f"{memory[0]} | {memory[1]} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
