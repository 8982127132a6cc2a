"""Train a nanoGPT-style model (attention is one ``F.scaled_dot_product_attention`` call)
with the dashboard. Nothing in the model knows about attnscope.

    python examples/train_nanogpt.py             # then open the printed URL
    python examples/train_nanogpt.py --steps 200 --port 0

The task: reverse a sequence of digits after a separator. ``--steps 0`` trains until
stopped (Ctrl-C).
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from attnscope import Dashboard

SYMBOLS = [str(d) for d in range(10)] + ["|"]
SEP = len(SYMBOLS) - 1


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention: fused q, k, v projection and one SDPA call."""

    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(),
                                 nn.Linear(4 * n_embd, n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token ids (B, T) -> logits (B, T, vocab)."""

    def __init__(self, vocab: int, block_size: int, n_layer: int = 2, n_head: int = 4,
                 n_embd: int = 64) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=0, help="steps to train (0: until stopped)")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--digits", type=int, default=8, help="digits to reverse")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds to wait between steps")
    return parser.parse_args()


def batch(n: int, digits: int) -> torch.Tensor:
    """(n, 2 * digits + 1) ids: digits, the separator, the digits reversed."""
    first = torch.randint(0, 10, (n, digits))
    return torch.cat([first, torch.full((n, 1), SEP), first.flip(1)], dim=1)


def main() -> int:
    args = _args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    model = GPT(len(SYMBOLS), 2 * args.digits + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    dash = Dashboard.start(model, port=args.port, name="nanogpt-reverse")
    try:
        step = 0
        while args.steps <= 0 or step < args.steps:
            ids = batch(32, args.digits)
            logits = model(ids[:, :-1])  # (B, T-1, vocab)
            target = ids[:, 1:].clone()
            target[:, : args.digits] = -100  # only the reversed half is predictable
            loss = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            labels = [[SYMBOLS[i] for i in row] for row in ids[:, :-1].tolist()]
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
