"""A 12-layer x 12-head causal transformer_core encoder, watched through Dashboard.start.

Run as a script by the browser tests and bench/browser.py:
``python tests/browser/big_model.py PORT``. The model is random (nothing to learn);
each step nudges its weights a little, so every statistic on the page moves. It steps
until terminated or ``--seconds`` (default 300) have passed.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from attnscope import Dashboard
from transformer_core.builders import TransformerEncoderBuilder
from transformer_core.masking import TriangularCausalMask

LAYERS, HEADS, E, SEQ = 12, 12, 4, 32


def build_model() -> torch.nn.Module:
    """Encoder (N, L, H*E) -> (N, L, H*E): 12 layers of 12 heads, 4 dims each.

    Head h of layer l has its query weights scaled by 10 ** ((h + l) / 8 - 1.2), from
    near-uniform heads (top left of the map) to peaked ones (bottom right).
    """
    model = TransformerEncoderBuilder.from_kwargs(
        n_layers=LAYERS, n_heads=HEADS, query_dimensions=E, value_dimensions=E,
        feed_forward_dimensions=2 * HEADS * E, dropout=0.0, attention_dropout=0.0,
    ).get().eval()
    with torch.no_grad():
        for l, layer in enumerate(model.layers):
            weight = layer.attention.query_projection.weight  # (H*E, d_model)
            for h in range(HEADS):
                weight[h * E:(h + 1) * E] *= 10 ** ((h + l) / 8 - 1.2)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--rate", type=float, default=20.0, help="steps per second at most")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = build_model()
    mask = TriangularCausalMask(SEQ)
    tokens = [f"t{i}" for i in range(SEQ)]
    x = torch.randn(1, SEQ, HEADS * E)  # the same input every step: changes come from weights
    with Dashboard.start(model, port=args.port, host="127.0.0.1", name="big 12x12") as dash:
        deadline = time.monotonic() + args.seconds
        step = 0
        while time.monotonic() < deadline:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.002 * torch.randn_like(p))
                y = model(x, attn_mask=mask)  # (N, L, d_model)
            dash.step(step, loss=float(y.pow(2).mean()), tokens=[tokens])
            step += 1
            time.sleep(1.0 / args.rate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
