"""A tiny transformer_core model with NaN in one head, watched through Dashboard.start.

Run as a script by the browser tests: ``python tests/browser/nan_model.py PORT``.
Layer 1 (the last of two) gets NaN query-projection weights for head 2 only, so
exactly that head's attention matrix is NaN while every other head stays finite.
The script steps the model (the dashboard serves http://127.0.0.1:PORT/)
until it is terminated or ``--seconds`` (default 300) have passed.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from attnscope import Dashboard
from transformer_core.builders import TransformerEncoderBuilder

LAYERS, HEADS, E, SEQ = 2, 4, 8, 12
NAN_LAYER, NAN_HEAD = 1, 2


def build_model() -> torch.nn.Module:
    """Encoder (N, L, H*E) -> (N, L, H*E) with NaN in head NAN_HEAD of layer NAN_LAYER."""
    model = TransformerEncoderBuilder.from_kwargs(
        n_layers=LAYERS, n_heads=HEADS, query_dimensions=E, value_dimensions=E,
        feed_forward_dimensions=4 * HEADS * E, dropout=0.0, attention_dropout=0.0,
    ).get()
    projection = model.layers[NAN_LAYER].attention.query_projection
    with torch.no_grad():
        projection.weight[NAN_HEAD * E:(NAN_HEAD + 1) * E] = float("nan")  # rows of head 2
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--seconds", type=float, default=300.0)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = build_model()
    tokens = [[f"t{i}" for i in range(SEQ)]]  # one sample's labels
    with Dashboard.start(model, port=args.port, host="127.0.0.1") as dash:
        deadline = time.monotonic() + args.seconds
        step = 0
        while time.monotonic() < deadline:
            with torch.no_grad():
                y = model(torch.randn(1, SEQ, HEADS * E))  # (N, L, d_model)
            dash.step(step, loss=float(torch.nan_to_num(y).pow(2).mean()), tokens=tokens)
            step += 1
            time.sleep(0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main())
