"""What do per-step head statistics cost at long sequences? The fused path vs the matrix path.

For a GPT-2-small-shaped causal model (12 layers x 12 heads, d_model 768, ff 3072,
batch 1) at each sequence length L, side by side in one process:

1. **Training step**: one SGD step (forward + backward), wall seconds (after a warm-up
   step at the smallest L).
2. **Statistics of one step** (the 12 layers' sample copies, as the history writer gets
   them every recorded step): (h) what the history writer does now
   (``attnscope.training.recorder.stats_of``: the matrix up to 4M values a copy, else
   128 spread query rows per head without the matrix), (r) the rows path at 128 rows per
   head at every length, (c) the rows path on every query row, and (m) the matrix path
   the history used before (``layer_statistics`` of each layer's attention matrix): wall
   and process CPU seconds, and the peak resident memory it added (this process re-runs
   itself with ``MALLOC_MMAP_THRESHOLD_`` set, so freed blocks go back at once and the
   peak is what was live).
   (m) at L=8192 holds a (12, 8192, 8192) float32 matrix per layer (3 GiB): it is run
   on one layer (``--matrix-layers``, in a child process capped at ``--matrix-limit-gib``
   of address space); 12 layers are 12 times that.

Ratios (writer work / training step) are what to read: this machine is shared, and
``uptime``'s load is printed beside the figures.

    .venv/bin/python bench/entropy.py                             # 512, 2048, 8192 (~15 min)
    .venv/bin/python bench/entropy.py --lengths 512 --layers 2    # quick
    .venv/bin/python bench/entropy.py --lengths 8192 --skip-matrix --skip-every-row  # ~4 min
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

ENV = "MALLOC_MMAP_THRESHOLD_"


def field(name: str) -> float:
    """A /proc/self/status memory field, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name):
            return int(line.split()[1]) / 1024
    raise RuntimeError(name)


def measured(fn) -> tuple[float, float, float]:
    """(wall s, process CPU s, peak resident MiB added) of ``fn()``."""
    Path("/proc/self/clear_refs").write_text("5")
    before = field("VmRSS:")
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0, field("VmHWM:") - before


def build(layers: int, heads: int, d_model: int, ff: int):
    from transformer_core.builders import TransformerEncoderBuilder
    from transformer_core.events import EventDispatcher

    dispatcher = EventDispatcher()
    model = TransformerEncoderBuilder.from_kwargs(
        n_layers=layers, n_heads=heads, query_dimensions=d_model // heads,
        value_dimensions=d_model // heads, feed_forward_dimensions=ff,
        attention_dropout=0.0, event_dispatcher=dispatcher).get()
    return model, dispatcher


def copies_of(model, dispatcher, x, mask) -> dict:
    """Each layer's sample-0 copy, as the history recorder keeps it (no attention computed)."""
    from transformer_core.events import AttentionEvent

    out: dict = {}

    def keep(event: AttentionEvent) -> None:
        out.setdefault(len(out), event.sample_copy(0))

    dispatcher.listen(AttentionEvent, keep)
    with torch.no_grad():
        model(x, attn_mask=mask)
    dispatcher.remove(keep)
    return out


def matrix_path(copies: dict) -> None:
    """The history's statistics before: each layer's attention matrix, then its statistics."""
    from attnscope.core.reduce import layer_statistics
    from attnscope.core.stats import MaskInfo, valid_key_counts

    with torch.no_grad():
        for event in copies.values():
            L, S = event.shape[2:]
            layer_statistics(event.attention(0), valid_key_counts(MaskInfo.of(event), 0, L, S))


def matrix_child(args: argparse.Namespace, L: int) -> str:
    """(m) in a child capped at ``--matrix-limit-gib`` of address space: its figures or
    how it failed."""
    cmd = [sys.executable, __file__, "--matrix-only", "--lengths", str(L),
           "--layers", str(args.matrix_layers), "--heads", str(args.heads),
           "--d-model", str(args.d_model), "--ff", str(args.ff)]
    limit = int(args.matrix_limit_gib * 2**30)

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    done = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=cap,
                          env={**os.environ, ENV: "65536"}, timeout=3600)
    if done.returncode:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return f"failed (exit {done.returncode}: {tail[:120]})"
    return done.stdout.strip().splitlines()[-1]


def run_matrix_only(args: argparse.Namespace) -> None:
    from transformer_core.masking import TriangularCausalMask

    L = args.lengths[0]
    model, dispatcher = build(args.layers, args.heads, args.d_model, args.ff)
    copies = copies_of(model, dispatcher, torch.randn(1, L, args.d_model),
                       TriangularCausalMask(L))
    wall, cpu, peak = measured(lambda: matrix_path(copies))
    print(f"{args.layers} layer(s): {wall:.2f} s wall, {cpu:.2f} s CPU, +{peak:.0f} MiB peak")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--ff", type=int, default=3072)
    parser.add_argument("--rows", type=int, default=128,
                        help="query rows per head (the history's default)")
    parser.add_argument("--skip-matrix", action="store_true", help="leave (m) out")
    parser.add_argument("--skip-every-row", action="store_true",
                        help="leave (c) out (at L=8192 it takes longer than the step)")
    parser.add_argument("--matrix-layers", type=int, default=1,
                        help="layers the matrix path runs on above --matrix-full-below")
    parser.add_argument("--matrix-full-below", type=int, default=4096,
                        help="the matrix path runs on every layer below this L")
    parser.add_argument("--matrix-limit-gib", type=float, default=12.0)
    parser.add_argument("--matrix-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if os.environ.get(ENV) is None:  # re-run with an allocator that returns what is freed
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, ENV: "65536"})
    if args.matrix_only:
        run_matrix_only(args)
        return

    from attnscope.core.history_items import StepItem, stats_of
    from attnscope.core.rowstats import event_statistics
    from transformer_core.masking import TriangularCausalMask

    print(f"load: {os.getloadavg()}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, {args.layers} layers x {args.heads} heads, d_model {args.d_model}")
    model, dispatcher = build(args.layers, args.heads, args.d_model, args.ff)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def train_step(x, mask) -> None:
        opt.zero_grad(set_to_none=True)
        model(x, attn_mask=mask).square().mean().backward()
        opt.step()

    warm = min(args.lengths)
    train_step(torch.randn(1, warm, args.d_model), TriangularCausalMask(warm))
    for L in args.lengths:
        x, mask = torch.randn(1, L, args.d_model), TriangularCausalMask(L)
        step_s, _, step_mib = measured(lambda x=x, mask=mask: train_step(x, mask))
        copies = copies_of(model, dispatcher, x, mask)
        item = StepItem("s", 0, 0.0, {}, copies, len(copies))
        rows = {"h": measured(lambda i=item: stats_of([i], args.rows))}
        for name, max_rows in (("r", args.rows), ("c", 0)):
            if name == "c" and args.skip_every_row:
                continue
            rows[name] = measured(lambda m=max_rows, c=copies: [
                event_statistics(e, m, method="rows") for e in c.values()])
        if args.skip_matrix:
            matrix = "not run (--skip-matrix)"
        elif args.matrix_full_below > L:
            wall, cpu, peak = measured(lambda c=copies: matrix_path(c))
            matrix = f"{wall:.2f} s wall ({wall / step_s:.1%} of a step), {cpu:.2f} s CPU, " \
                     f"+{peak:.0f} MiB peak"
        else:
            matrix = f"{args.matrix_layers} of {args.layers} layers: {matrix_child(args, L)}"
        print(f"\nL={L}: training step {step_s:.2f} s wall (+{step_mib:.0f} MiB peak), "
              f"load {os.getloadavg()[0]:.2f}")
        for name, label in (("h", "history writer now"), ("r", f"rows, {args.rows}/head"),
                            ("c", "rows, every row")):
            if name not in rows:
                print(f"  ({name}) {label}: not run (--skip-every-row)")
                continue
            wall, cpu, peak = rows[name]
            print(f"  ({name}) {label}: {wall:.2f} s wall ({wall / step_s:.1%} of a "
                  f"step), {cpu:.2f} s CPU, +{peak:.0f} MiB peak")
        print(f"  (m) matrix path: {matrix}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
