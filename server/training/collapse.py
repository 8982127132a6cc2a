"""The entropy-collapse demo: a small causal language model whose learning rate keeps
rising until its attention collapses, then its loss spikes.

The data is a random Markov chain over ``vocab`` tokens (each token's successor
drawn from a fixed, peaked distribution), so the loss cannot go to zero and the
gradients never vanish. The model learns it at a steady learning rate for
``steady_steps`` steps; then the rate grows by ``lr_growth`` per step. As in Zhai et
al. (2023, "Stabilizing Transformer Training by Preventing Attention Entropy
Collapse"), past some rate the attention logits grow, every head's entropy falls
towards 0 within a few dozen steps, and only then does the loss jump. The
dashboard's alerts (``attnscope.backend.alerts``) fire on the entropy, ahead of the loss
(``bench/collapse.py`` measures by how many steps).

Pure training, like :mod:`attnscope.training.demo`;
:class:`attnscope.training.demo_run.DemoRun` runs it.

>>> training = CollapseTraining(CollapseConfig(seq_len=8, batch_size=2, device="cpu"))
>>> result = training.step()
>>> result.step, len(result.tokens[0]), result.loss > 0, training.lr == 1e-3
(0, 8, True, True)

Shape legend: N batch, L sequence length, V vocabulary, D model width.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from transformer_core.builders import TransformerEncoderBuilder
from transformer_core.events import EventDispatcher
from transformer_core.masking import TriangularCausalMask

from .demo import (
    SeededTraining,
    StepResult,
    check_ints,
    check_numbers,
    reset_seeded,
    resolve_device,
)


@dataclass
class CollapseConfig:
    """Settings of the collapse demo; :meth:`validate` raises ``ValueError`` naming a field.

    The defaults collapse after ~250-300 steps (the rate near 0.03), the loss
    spiking some 10-40 steps after the entropy fell (bench/RESULTS.md, "collapse").
    """

    # 32 tokens, successors drawn from Dirichlet(0.3): a peaked but noisy chain, a loss
    # floor near 2.5 nats, so the gradients stay alive at every step.
    vocab: int = 32
    concentration: float = 0.3
    # 32 positions, 2 causal layers of 4 heads: a 2 x 4 map, small enough for ~50
    # steps a second on one CPU core.
    seq_len: int = 32
    n_layers: int = 2
    n_heads: int = 4
    d_head: int = 16
    feed_forward: int = 256
    batch_size: int = 32
    # Adam at 1e-3 for 100 steps learns the chain; then x1.02 per step: the rate reaches
    # ~0.02-0.04 at steps 250-300, where this model's attention collapses.
    lr: float = 1e-3
    steady_steps: int = 100
    lr_growth: float = 1.02
    # The rate stops growing here (the run has long diverged by then).
    lr_max: float = 1.0
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field with a bad value."""
        check_ints(self, {"vocab": (2, 65536), "seq_len": (4, 1024), "n_layers": (1, 12),
                          "n_heads": (1, 64), "d_head": (1, 512), "feed_forward": (1, 16384),
                          "batch_size": (1, 65536), "steady_steps": (0, 10**9)})
        check_numbers(self, {"lr": (0, 1), "lr_max": (0, 10), "concentration": (0, 100),
                             "lr_growth": (0, 2)})
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        resolve_device(self.device)

    @property
    def d_model(self) -> int:
        return self.n_heads * self.d_head

    def to_dict(self) -> dict:
        return asdict(self)


class MarkovTask:
    """Token sequences (N, L) of a random Markov chain, and their next tokens (N, L)."""

    def __init__(self, config: CollapseConfig) -> None:
        config.validate()
        self.config = config
        self.symbols = [f"t{i}" for i in range(config.vocab)]
        self.generator = torch.Generator().manual_seed(config.seed)
        self.transitions = torch.zeros(config.vocab, config.vocab)  # (V, V): set by reset
        self.reset()

    def reset(self) -> None:
        """The chain and the data stream as at creation (from the seed)."""
        self.generator.manual_seed(self.config.seed)
        gamma = torch._standard_gamma(torch.full((self.config.vocab, self.config.vocab),
                                                 self.config.concentration),
                                      generator=self.generator)  # (V, V) Dirichlet rows
        self.transitions = gamma / gamma.sum(-1, keepdim=True)

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (N, L) and targets (N, L): each target is the next token of the chain."""
        L = self.config.seq_len
        x = torch.empty(n, L + 1, dtype=torch.long)
        x[:, 0] = torch.randint(self.config.vocab, (n,), generator=self.generator)
        for t in range(L):
            x[:, t + 1] = torch.multinomial(self.transitions[x[:, t]], 1,
                                            generator=self.generator)[:, 0]
        return x[:, :-1], x[:, 1:]


class CausalModel(nn.Module):
    """Token + learned position embedding -> causal post-LN encoder -> next-token logits.
    Every layer talks to ``event_dispatcher``."""

    def __init__(self, config: CollapseConfig,
                 event_dispatcher: str | EventDispatcher = "") -> None:
        super().__init__()
        config.validate()
        d = config.d_model
        self.seq_len = config.seq_len
        self.embedding = nn.Embedding(config.vocab, d)
        self.position = nn.Embedding(config.seq_len, d)
        self.encoder = TransformerEncoderBuilder.from_kwargs(
            n_layers=config.n_layers, n_heads=config.n_heads, query_dimensions=config.d_head,
            value_dimensions=config.d_head, feed_forward_dimensions=config.feed_forward,
            dropout=0.0, attention_dropout=0.0, event_dispatcher=event_dispatcher).get()
        self.head = nn.Linear(d, config.vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (N, L) long, L <= seq_len -> next-token logits (N, L, V)."""
        if tokens.ndim != 2 or tokens.shape[1] > self.seq_len:
            raise ValueError(f"tokens: expected shape (N, L) with L <= {self.seq_len}, got "
                             f"{tuple(tokens.shape)}")
        L = tokens.shape[1]
        x = self.embedding(tokens) + self.position(torch.arange(L, device=tokens.device))
        return self.head(self.encoder(x, attn_mask=TriangularCausalMask(L, device=x.device)))

    def reset_parameters(self, seed: int) -> None:
        """Re-initialise every parameter in place from ``seed`` (the global RNG is kept)."""
        reset_seeded(self, seed)


@dataclass
class CollapseStep(StepResult):
    """A :class:`~attnscope.training.demo.StepResult` plus the learning rate the step used."""

    lr: float = math.nan


class CollapseTraining(SeededTraining):
    """Model, optimiser and task of the collapse demo; the interface of
    :class:`attnscope.training.demo.DemoTraining` (``step``, ``reset``, ``model``, ``task``,
    ``device``)."""

    def __init__(self, config: CollapseConfig | None = None,
                 event_dispatcher: str | EventDispatcher = "") -> None:
        config = config if config is not None else CollapseConfig()
        super().__init__(config, lambda: CausalModel(config, event_dispatcher),
                         lambda: MarkovTask(config))

    def _init_state(self) -> None:
        self.model.reset_parameters(self.config.seed)
        self.task.reset()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.config.lr)
        self._steps_done = 0

    @property
    def lr(self) -> float:
        """The learning rate of the next step: steady, then growing, then capped."""
        c = self.config
        grown = c.lr * c.lr_growth ** max(0, self._steps_done - c.steady_steps)
        return min(c.lr_max, grown)

    def step(self) -> CollapseStep:
        """One optimisation step on one batch at :attr:`lr`; ``accuracy`` is next-token."""
        with self._lock:
            inputs, targets = self.task.batch(self.config.batch_size)  # (N, L) each
            labels = [[self.task.symbols[i] for i in row] for row in inputs.tolist()]
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            lr = self.lr
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.model.train()
            logits = self.model(inputs)  # (N, L, V)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            with torch.no_grad():
                hits = (logits.argmax(-1) == targets).float().mean()
                values = torch.stack([loss.detach(), hits]).tolist()
            step = self._steps_done
            self._steps_done += 1
        return CollapseStep(step=step, loss=values[0], accuracy=values[1], tokens=labels, lr=lr)
