"""Train a tiny Hugging Face GPT-2 (random init from a config, no download) with the dashboard.

    python examples/train_gpt2.py                # then open the printed URL
    python examples/train_gpt2.py --steps 200 --port 0

The task: continue a sequence of random letters by repeating it (an induction task:
watch the induction heads form). The model keeps its default ``sdpa`` attention;
the dashboard reads q and k from it and builds heatmaps only while the page looks.
``--steps 0`` trains until stopped (Ctrl-C).
"""

from __future__ import annotations

import argparse
import logging
import string
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from attnscope import Dashboard

LETTERS = list(string.ascii_lowercase[:16])


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=0, help="steps to train (0: until stopped)")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--half", type=int, default=12, help="letters before the repeat")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds to wait between steps")
    return parser.parse_args()


def batch(n: int, half: int) -> torch.Tensor:
    """(n, 2 * half) token ids: random letters, then the same letters again."""
    first = torch.randint(0, len(LETTERS), (n, half))
    return torch.cat([first, first], dim=1)


def main() -> int:
    args = _args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(LETTERS), n_positions=2 * args.half, n_embd=64,
                        n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    dash = Dashboard.start(model, port=args.port, name="tiny-gpt2")
    try:
        step = 0
        while args.steps <= 0 or step < args.steps:
            ids = batch(16, args.half)
            loss = model(input_ids=ids, labels=ids).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            labels = [[LETTERS[i] for i in row] for row in ids.tolist()]
            dash.step(step, loss=loss.item(), tokens=labels)
            step += 1
            if args.sleep:
                time.sleep(args.sleep)
    except KeyboardInterrupt:
        pass
    finally:
        dash.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
