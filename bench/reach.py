"""Benchmark watching other people's models: Hugging Face GPT-2 and nn.TransformerEncoder.

Side by side in one process (interleaved repetitions, medians of per-round ratios),
eval forward, no grad, batch 4, L = 512:

GPT-2 (4 layers, 256 wide, 4 heads) on its default ``sdpa``:
  plain          the model as built, nothing of ours imported into it;
  attached       the same weights after ``instrument(model)``, nobody listening;
  watched        attached, plus one listener per layer reading every head of sample 0
                 (what one viewer of all heads costs: the lazy matrix is built);
  eager+attn     the alternative users have today: ``attn_implementation="eager"``
                 and ``output_attentions=True``.
nn.TransformerEncoder (same sizes, fused fast path): plain / attached / watched, and
  the alternative: each layer's ``self_attn(need_weights=True)`` called by hand.

Usage: ``python bench/reach.py [--quick] [--threads N]``; prints markdown tables.
Targets: attached <= 1.03x plain; watched well below eager+attn.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformer_core.instrument import instrument  # noqa: E402

D_MODEL, HEADS, LAYERS, BATCH, L = 256, 4, 4, 4, 512


def gpt2(implementation: str) -> nn.Module:
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    config = GPT2Config(n_layer=LAYERS, n_head=HEADS, n_embd=D_MODEL, n_positions=L,
                        vocab_size=1000, bos_token_id=0, eos_token_id=0,
                        attn_implementation=implementation)
    return GPT2Model(config).eval()


def encoder() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D_MODEL, HEADS, 4 * D_MODEL, batch_first=True)
    return nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False).eval()


def watch(model: nn.Module) -> None:
    """One viewer of all heads: every layer's sample-0 matrix is built on each forward."""
    for site in instrument(model):
        site.dispatcher.listen(lambda ev: True, lambda ev: ev.attention(sample=0))


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(cases: dict[str, Callable[[], object]], rounds: int) -> dict[str, tuple[float, float]]:
    """name -> (median seconds, median ratio to the first case), interleaved rounds."""
    with torch.no_grad():
        for fn in cases.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(rounds):
            for name, fn in cases.items():
                times[name].append(timed(fn))
    base = next(iter(cases))
    return {name: (statistics.median(t), statistics.median(
        a / b for a, b in zip(t, times[base], strict=True))) for name, t in times.items()}


def table(title: str, results: dict[str, tuple[float, float]]) -> str:
    lines = [f"### {title}", "", "| case | ms | x plain |", "| --- | --- | --- |"]
    lines += [f"| {name} | {sec * 1e3:.1f} | {ratio:.3f} |"
              for name, (sec, ratio) in results.items()]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds instead of 30")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = 5 if args.quick else 30

    ids = torch.randint(0, 1000, (BATCH, L))
    plain, attached, watched = gpt2("sdpa"), gpt2("sdpa"), gpt2("sdpa")
    eager = gpt2("eager")
    for m in (attached, watched, eager):
        m.load_state_dict(plain.state_dict())
    instrument(attached)
    watch(watched)
    print(table(f"GPT-2 ({LAYERS} layers, {D_MODEL} wide, sdpa), batch {BATCH}, L = {L}", compare({
        "plain": lambda: plain(ids),
        "attached, nobody listening": lambda: attached(ids),
        "watched (all heads of sample 0)": lambda: watched(ids),
        "eager + output_attentions": lambda: eager(ids, output_attentions=True),
    }, rounds)))

    x = torch.randn(BATCH, L, D_MODEL)
    e_plain = encoder()
    e_attached, e_watched = copy.deepcopy(e_plain), copy.deepcopy(e_plain)
    instrument(e_attached)
    watch(e_watched)

    def need_weights() -> None:  # the alternative: ask each layer for its weights
        h = x
        for layer in e_plain.layers:
            layer.self_attn(h, h, h, need_weights=True, average_attn_weights=False)
            h = layer(h)

    print()
    print(table(f"nn.TransformerEncoder (fast path), batch {BATCH}, L = {L}", compare({
        "plain": lambda: e_plain(x),
        "attached, nobody listening": lambda: e_attached(x),
        "watched (all heads of sample 0)": lambda: e_watched(x),
        "need_weights=True per layer": need_weights,
    }, rounds)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
