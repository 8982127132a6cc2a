"""Type a text on the page and watch every head of a tiny GPT-2 read it, while it trains.

    python examples/look_at_text.py          # then open the printed URL and type a sentence
    python examples/look_at_text.py --port 0 --sleep 0.05 --steps 2000

Everything is made here, no download: a byte-level BPE tokenizer trained in milliseconds
on generated sentences ("the cat sat on the mat.", examples/toy_text.py), and a 2-layer,
4-head GPT-2 from a config, trained to continue them. ``Dashboard.start(model,
tokenizer=tok)`` gives the page's text box the tokenizer: "Look" shows every layer and
head of the text you type (token strings on both axes), "Pin" captures it again every k
steps so you can watch its heads change as the model learns, "compare" puts two texts
side by side. ``--steps 0`` trains until stopped (Ctrl-C).
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
import transformers
from toy_text import sentences, tokenizer

from attnscope import Dashboard


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=0, help="steps to train (0: until stopped)")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--sleep", type=float, default=0.05, help="seconds between steps")
    parser.add_argument("--name", default="gpt2-text", help="the run's name")
    args = parser.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(0)
    tok = tokenizer()
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64,
                                     vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    model = transformers.GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    dash = Dashboard.start(model, port=args.port, name=args.name, tokenizer=tok)
    try:
        step = 0
        while args.steps <= 0 or step < args.steps:
            batch = tok(["".join(sentences(3, seed=step * 8 + i)) for i in range(8)],
                        return_tensors="pt", padding=True)
            loss = model(**batch, labels=batch["input_ids"]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            dash.step(step, loss=loss.item(), tokens=batch["input_ids"])
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
