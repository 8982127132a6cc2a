"""Benchmark transformer_core against torch.nn.TransformerEncoder and the seed's approach.

Measures, side by side in one process (interleaved repetitions, medians):

1. forward, eval, no grad, no listener, batch 4, L = 128 .. 4096:
   ours vs the faster of torch.nn.TransformerEncoder with its fast path on / off,
   and the seed library's approach (``use_fused = False``: always build the matrix);
2. forward + backward (train mode, dropout 0.1), no listener, batch 4;
3. a listener reading ``event.attention(sample=0, heads=slice(None))`` on every
   layer, batch 8, L = 512, vs no listener;
4. peak memory (resident set, ``ru_maxrss``) of one layer, batch 1, no listener,
   L = 512 .. 8192, each size in a fresh subprocess.

Model: d_model 256, 4 heads, 4 layers, feed-forward 1024, dropout 0.1, post-norm.

Times are medians of the interleaved rounds; ratios are medians of the per-round
ratios (each pair measured back to back), which a shared machine's drifts affect less.

Usage: ``python bench/core.py [--quick] [--threads 2] [--only forward ...]``;
prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformer_core.builders import TransformerEncoderBuilder  # noqa: E402
from transformer_core.events import AttentionEvent, EventDispatcher  # noqa: E402

D_MODEL, HEADS, LAYERS, FF, DROPOUT = 256, 4, 4, 1024, 0.1
TARGETS = {"forward": 1.10, "backward": 1.05, "listener": 1.25, "memory_mb": 400}


def build_ours(n_layers: int = LAYERS, fused: bool = True) -> nn.Module:
    """Our encoder on a private dispatcher; ``fused=False`` is the seed's approach."""
    net = TransformerEncoderBuilder.from_kwargs(
        n_layers=n_layers, n_heads=HEADS, query_dimensions=D_MODEL // HEADS,
        value_dimensions=D_MODEL // HEADS, feed_forward_dimensions=FF, dropout=DROPOUT,
        attention_dropout=DROPOUT, final_normalization=True, event_dispatcher=EventDispatcher(),
    ).get()
    for layer in net.layers:
        layer.attention.inner_attention.use_fused = fused
    return net


def build_torch(n_layers: int = LAYERS) -> nn.Module:
    """torch.nn.TransformerEncoder with the same sizes (and a final LayerNorm, as ours)."""
    layer = nn.TransformerEncoderLayer(D_MODEL, HEADS, FF, DROPOUT, batch_first=True)
    return nn.TransformerEncoder(layer, n_layers, norm=nn.LayerNorm(D_MODEL),
                                 enable_nested_tensor=False)


def with_fastpath(enabled: bool, fn: Callable[[], object]) -> Callable[[], object]:
    def call():
        torch.backends.mha.set_fastpath_enabled(enabled)
        try:
            return fn()
        finally:
            torch.backends.mha.set_fastpath_enabled(True)

    return call


class Timings(dict):
    """Seconds per round for each case, measured in interleaved rounds."""

    def median(self, name: str) -> float:
        return statistics.median(self[name])

    def ratio(self, name: str, baseline: str) -> float:
        """Median over rounds of ``name / baseline`` measured in the same round.

        Pairing rounds cancels most of the slow drifts of a shared, noisy machine.
        """
        return statistics.median(a / b for a, b in zip(self[name], self[baseline], strict=True))


def interleaved(cases: dict[str, Callable[[], object]], reps: int) -> Timings:
    """One warm-up call per case, then ``reps`` rounds calling every case once."""
    for fn in cases.values():
        fn()
    times = Timings({name: [] for name in cases})
    for _ in range(reps):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def bench_forward(lengths: list[int], batch: int, reps: int) -> Iterator[str]:
    ours, seed, ref = build_ours().eval(), build_ours(fused=False).eval(), build_torch().eval()
    yield ("| L | ours ms | torch fast path ms | torch no fast path ms | seed approach ms "
           "| ours / best torch | seed / best torch |")
    yield "|---|---|---|---|---|---|---|"
    for L in lengths:
        x = torch.randn(batch, L, D_MODEL)
        with torch.no_grad():
            t = interleaved({
                "ours": lambda x=x: ours(x),
                "fast": with_fastpath(True, lambda x=x: ref(x)),
                "slow": with_fastpath(False, lambda x=x: ref(x)),
                "seed": lambda x=x: seed(x),
            }, reps if L <= 1024 else 3)
        best = min(("fast", "slow"), key=t.median)
        yield (f"| {L} | {ms(t.median('ours'))} | {ms(t.median('fast'))} | "
                    f"{ms(t.median('slow'))} | {ms(t.median('seed'))} | "
                    f"{t.ratio('ours', best):.2f}x | {t.ratio('seed', best):.2f}x |")


def bench_backward(lengths: list[int], batch: int, reps: int) -> Iterator[str]:
    ours, seed, ref = build_ours().train(), build_ours(fused=False).train(), build_torch().train()

    def step(net, x):
        return lambda: net(x).sum().backward()

    yield "| L | ours ms | torch ms | seed approach ms | ours / torch | seed / torch |"
    yield "|---|---|---|---|---|---|"
    for L in lengths:
        x = torch.randn(batch, L, D_MODEL)
        t = interleaved({"ours": step(ours, x), "torch": step(ref, x), "seed": step(seed, x)},
                        reps)
        yield (f"| {L} | {ms(t.median('ours'))} | {ms(t.median('torch'))} | "
                    f"{ms(t.median('seed'))} | {t.ratio('ours', 'torch'):.2f}x | "
                    f"{t.ratio('seed', 'torch'):.2f}x |")


def bench_listener(L: int, batch: int, reps: int) -> Iterator[str]:
    """A dashboard-like listener: every layer's sample 0, all heads, copied out."""
    yield "| model | no listener ms | listener ms | listener / no listener |"
    yield "|---|---|---|---|"
    x = torch.randn(batch, L, D_MODEL)
    kept: list[torch.Tensor] = []

    def read(event: AttentionEvent) -> None:
        kept.append(event.attention(sample=0, heads=slice(None)))
        del kept[:-LAYERS]

    nets = {"ours": build_ours().eval(), "seed approach": build_ours(fused=False).eval()}
    cases: dict[str, Callable[[], object]] = {}
    for name, net in nets.items():
        dispatcher = net.layers[0].event_dispatcher

        def quiet(net=net, dispatcher=dispatcher):
            dispatcher.clear()
            return net(x)

        def loud(net=net, dispatcher=dispatcher):
            dispatcher.listen(AttentionEvent, read)
            try:
                return net(x)
            finally:
                dispatcher.clear()

        cases[name + "|quiet"], cases[name + "|loud"] = quiet, loud
    with torch.no_grad():
        t = interleaved(cases, reps)
    assert len(kept) == LAYERS and kept[0].shape == (HEADS, L, L)
    for name in nets:
        quiet, loud = name + "|quiet", name + "|loud"
        yield (f"| {name} | {ms(t.median(quiet))} | {ms(t.median(loud))} | "
                    f"{t.ratio(loud, quiet):.2f}x |")


def _status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def memory_child(impl: str, L: int) -> None:
    """In a fresh process: peak resident-set growth (MB) of one forward, one layer, batch 1.

    The peak (``VmHWM``) is reset by writing 5 to ``/proc/self/clear_refs`` just
    before the forward; growth = peak during the forward - resident set before it.
    (``ru_maxrss`` is not used: after fork + exec it keeps the parent's peak.)
    """
    net = (build_torch(1) if impl == "torch" else build_ours(1, fused=impl == "ours")).eval()
    x = torch.randn(1, L, D_MODEL)
    with torch.no_grad():
        net(torch.randn(1, 8, D_MODEL))  # load kernels and warm the allocator first
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        before = _status_mb("VmRSS")
        net(x)
        peak = _status_mb("VmHWM")
    print(json.dumps({"impl": impl, "L": L, "growth_mb": peak - before, "peak_mb": peak}))


def bench_memory(lengths: list[int], threads: int) -> Iterator[str]:
    impls = ["ours", "torch", "seed"]
    results: dict[tuple[str, int], float] = {}
    for L in lengths:
        for impl in impls:
            out = subprocess.run(
                [sys.executable, __file__, "--memory-child", impl, str(L), "--threads",
                 str(threads)], capture_output=True, text=True, check=True, timeout=600,
            )
            results[impl, L] = json.loads(out.stdout.strip().splitlines()[-1])["growth_mb"]
    yield "| L | ours MB | torch MB | seed approach MB |"
    yield "|---|---|---|---|"
    for L in lengths:
        yield (f"| {L} | " + " | ".join(f"{results[i, L]:.0f}" for i in impls) + " |")
    first, last = lengths[0], lengths[-1]
    growth = " | ".join(f"{results[i, last] - results[i, first]:.0f}" for i in impls)
    yield (f"| growth {first} -> {last} | {growth} |")


def emit(rows: Iterator[str]) -> None:
    """Print each table row as soon as it is measured."""
    for row in rows:
        print(row, flush=True)
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few lengths and repetitions")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per measurement")
    parser.add_argument("--only", choices=["forward", "backward", "listener", "memory"],
                        action="append", help="run only these sections (repeatable)")
    parser.add_argument("--memory-child", nargs=2, metavar=("IMPL", "L"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child[0], int(args.memory_child[1]))
        return
    torch.manual_seed(0)
    reps = args.reps or (3 if args.quick else 5)
    sections = args.only or ["forward", "backward", "listener", "memory"]
    fwd_lengths = [128, 1024] if args.quick else [128, 256, 512, 1024, 2048, 4096]
    bwd_lengths = [1024] if args.quick else [256, 1024]
    mem_lengths = [512, 2048] if args.quick else [512, 1024, 2048, 4096, 8192]
    cpu = next((line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    print(f"torch {torch.__version__}, {args.threads} threads, CPU: {cpu} "
          f"({os.cpu_count()} cores visible), "
          f"d_model {D_MODEL}, {HEADS} heads, {LAYERS} layers, ff {FF}, reps {reps}\n")
    if "forward" in sections:
        print(f"### forward, eval, no grad, no listener, batch 4 "
              f"(target ours <= {TARGETS['forward']:.2f}x at L=1024)\n")
        emit(bench_forward(fwd_lengths, 4, reps))
    if "backward" in sections:
        print(f"### forward + backward, train mode, no listener, batch 4 "
              f"(target ours <= {TARGETS['backward']:.2f}x at L=1024)\n")
        emit(bench_backward(bwd_lengths, 4, reps))
    if "listener" in sections:
        print(f"### listener reading event.attention(sample=0, heads=slice(None)) on every "
              f"layer, eval, no grad, batch 8, L=512 (target <= {TARGETS['listener']:.2f}x)\n")
        emit(bench_listener(512, 8, reps))
    if "memory" in sections:
        print(f"### peak resident-set growth during one forward (VmHWM after - VmRSS before, "
              f"fresh process per cell), one layer, batch 1, eval, no grad, no listener "
              f"(target: growth from the first to the last L < {TARGETS['memory_mb']} MB)\n")
        emit(bench_memory(mem_lengths, args.threads))


if __name__ == "__main__":
    main()
