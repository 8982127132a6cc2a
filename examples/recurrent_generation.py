"""Recurrent inference on the dashboard: a small causal model generates token by token.

    python examples/recurrent_generation.py            # then open the printed URL
    python examples/recurrent_generation.py --train-steps 30 --sequences 2 --delay 0 --port 0

A batch model (built with ``TransformerEncoderBuilder``, causal mask) learns to reverse
digits after a separator. Its weights go into the recurrent twin built with
``RecurrentEncoderBuilder`` (the same parameter names), which then reads a prompt and
writes the answer one token per call, with the dashboard up. Each token is one
``dash.step``: the page's heatmaps gain a row per token (the keys axis grows with it)
and start over at ``dash.new_sequence()``. ``--sequences 0`` generates until stopped.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from attnscope import Dashboard
from transformer_core.builders import RecurrentEncoderBuilder, TransformerEncoderBuilder
from transformer_core.masking import TriangularCausalMask

SYMBOLS = [str(d) for d in range(10)] + ["|"]
SEP = len(SYMBOLS) - 1
# 2 layers of 4 heads: layer 0 finds the position to copy, layer 1 copies it.
SIZES = dict(n_layers=2, n_heads=4, query_dimensions=16, value_dimensions=16,
             feed_forward_dimensions=128, attention_type="full", dropout=0.0,
             attention_dropout=0.0)


class LanguageModel(nn.Module):
    """Token and position embeddings, a stack of layers (``encoder``) and a head.

    Batch: ``forward(tokens (N, L))`` -> logits (N, L, V), causal. Recurrent (an
    encoder from ``RecurrentEncoderBuilder``): ``forward(token (N,), position, state)``
    -> (logits (N, V), state). Both have the same parameter names, so one's
    ``state_dict`` loads into the other.
    """

    def __init__(self, encoder: nn.Module, d_model: int, max_len: int) -> None:
        super().__init__()
        self.token = nn.Embedding(len(SYMBOLS), d_model)
        self.position = nn.Embedding(max_len, d_model)
        self.encoder = encoder
        self.head = nn.Linear(d_model, len(SYMBOLS))

    def forward(self, tokens: torch.Tensor, position: int | None = None, state=None):
        if position is None:  # a whole batch of sequences (N, L)
            L = tokens.shape[1]
            x = self.token(tokens) + self.position(torch.arange(L))  # (N, L, d_model)
            return self.head(self.encoder(x, attn_mask=TriangularCausalMask(L)))
        x = self.token(tokens) + self.position.weight[position]  # (N, d_model)
        y, state = self.encoder(x, state=state)
        return self.head(y), state


def build(recurrent: bool, digits: int) -> LanguageModel:
    builder = RecurrentEncoderBuilder if recurrent else TransformerEncoderBuilder
    d_model = SIZES["n_heads"] * SIZES["query_dimensions"]
    return LanguageModel(builder.from_kwargs(**SIZES).get(), d_model, 2 * digits + 1)


def batch(n: int, digits: int) -> torch.Tensor:
    """(n, 2 * digits + 1) ids: digits, the separator, the digits reversed."""
    first = torch.randint(0, 10, (n, digits))
    return torch.cat([first, torch.full((n, 1), SEP), first.flip(1)], dim=1)


def train(steps: int, digits: int) -> LanguageModel:
    """The batch model after ``steps`` steps of Adam on reversal (the answer half only)."""
    model = build(recurrent=False, digits=digits)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        ids = batch(64, digits)
        logits = model(ids[:, :-1])  # (N, L - 1, V)
        target = ids[:, 1:].clone()
        target[:, :digits] = -100  # the prompt is random: only the answer is predictable
        loss = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            logging.info("training step %d: loss %.3f", step, loss.item())
    return model.eval()


def generate(model: LanguageModel, dash, prompt: list[int], digits: int, first_step: int,
             delay: float) -> tuple[list[int], int]:
    """Read ``prompt`` (digits and the separator) and write ``digits`` tokens, one call
    and one ``dash.step`` per token; returns (the answer, the next step number)."""
    dash.new_sequence()
    state, answer, step = None, [], first_step
    token = prompt[0]
    with torch.no_grad():
        for position in range(len(prompt) + digits - 1):
            logits, state = model(torch.tensor([token]), position, state)
            dash.step(step, tokens=[[SYMBOLS[token]]])  # the token this row reads
            step += 1
            if position + 1 < len(prompt):
                token = prompt[position + 1]
            else:
                token = int(logits[0].argmax())
                answer.append(token)
            if delay:
                time.sleep(delay)
    return answer, step


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--digits", type=int, default=8, help="digits to reverse")
    parser.add_argument("--train-steps", type=int, default=200,
                        help="steps to train the batch model (loss ~0.002 after 100)")
    parser.add_argument("--sequences", type=int, default=20,
                        help="sequences to generate (0: until stopped)")
    parser.add_argument("--delay", type=float, default=0.3, help="seconds between tokens")
    return parser.parse_args()


def main() -> int:
    args = _args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    trained = train(args.train_steps, args.digits)
    model = build(recurrent=True, digits=args.digits).eval()
    model.load_state_dict(trained.state_dict())  # same names: the weights carry over
    dash = Dashboard.start(model, port=args.port, name="recurrent-generation")
    try:
        step, done, correct = 0, 0, 0
        while args.sequences <= 0 or done < args.sequences:
            digits = torch.randint(0, 10, (args.digits,)).tolist()
            answer, step = generate(model, dash, digits + [SEP], args.digits, step, args.delay)
            done += 1
            correct += answer == digits[::-1]
            logging.info("%s | %s (%d of %d right)", "".join(SYMBOLS[i] for i in digits),
                         "".join(SYMBOLS[i] for i in answer), correct, done)
    except KeyboardInterrupt:
        pass
    finally:
        dash.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
