"""The induction-heads demo: a two-layer attention-only transformer learns to continue
a repeated sequence of random tokens.

Each training sequence holds a random block of T tokens followed by the same
block again (T varies per sequence, so no head can just look a fixed distance
back), then random filler. Nothing in the first block can be predicted; every
token of the repeat can, by an *induction* circuit (Olsson et al., 2022): a
layer-0 head attends to the previous token, so each position knows its
predecessor; a layer-1 head then attends to the position after the previous
occurrence of the current token and copies it. The loss on the repeat drops in
a visible phase change when the two heads form.

Pure training, like :mod:`attnscope.training.demo`;
:class:`attnscope.training.demo_run.DemoRun` runs it.

>>> training = InductionTraining(InductionConfig(seq_len=16, batch_size=2, device="cpu"))
>>> tokens, repeat = training.task.batch(2)
>>> tokens.shape, repeat.shape, bool(repeat.any())
(torch.Size([2, 16]), torch.Size([2, 15]), True)
>>> result = training.step()
>>> result.step, len(result.tokens[0]), result.repeat_loss > 0
(0, 16, True)

Shape legend: N batch, L sequence length, V vocabulary, H heads, D model width.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from transformer_core.attention import AttentionLayer, FullAttention
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

logger = logging.getLogger(__name__)


@dataclass
class InductionConfig:
    """Settings of the induction demo; :meth:`validate` raises ``ValueError`` naming a field.

    The defaults show the phase change after ~250 steps (~15-60 s on two
    loaded CPU cores): the repeat's loss falls from ln(64) = 4.2 to below 0.5.
    """

    # 64 tokens: a random guess scores 1/64, and a block of 8-16 rarely repeats a token.
    vocab: int = 64
    # 32 positions: blocks of 8-16 tokens, then their repeat, then filler.
    seq_len: int = 32
    # 2 layers: the least an induction circuit needs (previous-token head, then induction head).
    n_layers: int = 2
    # 4 heads per layer: a 2 x 4 grid; a few heads idle, which is part of the lesson.
    n_heads: int = 4
    d_head: int = 16
    batch_size: int = 64
    # Adam at 3e-3: the phase change after ~250 steps, a plateau first (1e-3: ~550 steps).
    lr: float = 3e-3
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field with a bad value."""
        check_ints(self, {"vocab": (4, 65536), "seq_len": (8, 1024), "n_layers": (1, 12),
                          "n_heads": (1, 64), "d_head": (1, 512), "batch_size": (1, 65536)})
        check_numbers(self, {"lr": (0, 1)})
        resolve_device(self.device)

    @property
    def d_model(self) -> int:
        return self.n_heads * self.d_head

    def to_dict(self) -> dict:
        return asdict(self)


class RepeatTask:
    """Sequences (N, L): a random block of T tokens (L/4 <= T <= L/2, per sequence), the
    same block again, random filler; and where the next token is a repeat (N, L-1)."""

    def __init__(self, config: InductionConfig, generator: torch.Generator | None = None) -> None:
        config.validate()
        self.vocab = config.vocab
        self.seq_len = config.seq_len
        self.symbols = [f"t{i}" for i in range(config.vocab)]
        self.generator = generator or torch.Generator().manual_seed(config.seed)

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (N, L) long and ``repeat`` (N, L-1) bool: the token after position i is
        the second copy of a block token that position i can predict (not the first)."""
        L = self.seq_len
        x = torch.randint(self.vocab, (n, L), generator=self.generator)  # (N, L)
        T = torch.randint(L // 4, L // 2 + 1, (n, 1), generator=self.generator)  # (N, 1)
        pos = torch.arange(L)  # (L,)
        in_repeat = (pos >= T) & (pos < 2 * T)  # (N, L)
        x = torch.gather(x, 1, torch.where(in_repeat, pos - T, pos))  # (N, L)
        target = pos[1:]  # (L-1,): the position each prediction is for
        repeat = (target > T) & (target < 2 * T)  # (N, L-1): skip the repeat's first token
        return x, repeat


class AttentionOnlyModel(nn.Module):
    """Token + learned position embedding -> n_layers x (x + attention(LayerNorm(x))) ->
    unembedding. No MLPs: everything the model computes is in its attention heads.
    Every layer is causal and talks to ``event_dispatcher``."""

    def __init__(self, config: InductionConfig,
                 event_dispatcher: str | EventDispatcher = "") -> None:
        super().__init__()
        config.validate()
        d = config.d_model
        self.seq_len = config.seq_len
        self.embedding = nn.Embedding(config.vocab, d)
        self.position = nn.Embedding(config.seq_len, d)
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(config.n_layers))
        self.layers = nn.ModuleList(
            AttentionLayer(FullAttention(attention_dropout=0.0, event_dispatcher=event_dispatcher),
                           d, config.n_heads, event_dispatcher=event_dispatcher)
            for _ in range(config.n_layers))
        self.unembed = nn.Linear(d, config.vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (N, L) long, L <= seq_len -> next-token logits (N, L, V)."""
        if tokens.ndim != 2 or tokens.shape[1] > self.seq_len:
            raise ValueError(f"tokens: expected shape (N, L) with L <= {self.seq_len}, got "
                             f"{tuple(tokens.shape)}")
        L = tokens.shape[1]
        x = self.embedding(tokens) + self.position(torch.arange(L, device=tokens.device))
        mask = TriangularCausalMask(L, device=tokens.device)
        for norm, layer in zip(self.norms, self.layers, strict=True):
            h = norm(x)  # (N, L, D)
            x = x + layer(h, h, h, attn_mask=mask)
        return self.unembed(x)  # (N, L, V)

    def reset_parameters(self, seed: int) -> None:
        """Re-initialise every parameter in place from ``seed`` (the global RNG is kept)."""
        reset_seeded(self, seed)


@dataclass
class InductionStep(StepResult):
    """A :class:`~attnscope.training.demo.StepResult` plus ``repeat_loss``: the mean
    cross-entropy on
    the predictable tokens (the repeat), the curve with the phase change."""

    repeat_loss: float = math.nan


class InductionTraining(SeededTraining):
    """Model, optimiser and task of the induction demo; the interface of
    :class:`attnscope.training.demo.DemoTraining` (``step``, ``reset``, ``model``, ``task``,
    ``device``)."""

    def __init__(self, config: InductionConfig | None = None,
                 event_dispatcher: str | EventDispatcher = "") -> None:
        config = config if config is not None else InductionConfig()
        super().__init__(config, lambda: AttentionOnlyModel(config, event_dispatcher),
                         lambda: RepeatTask(config))

    def _init_state(self) -> None:
        self.model.reset_parameters(self.config.seed)
        self.task.generator.manual_seed(self.config.seed)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.config.lr)
        self._steps_done = 0

    def step(self) -> InductionStep:
        """One optimisation step on one batch; ``accuracy`` is on the repeat's tokens."""
        with self._lock:
            tokens, repeat = self.task.batch(self.config.batch_size)  # (N, L), (N, L-1)
            labels = [[self.task.symbols[i] for i in row] for row in tokens.tolist()]
            tokens, repeat = tokens.to(self.device), repeat.to(self.device)
            self.model.train()
            logits = self.model(tokens)[:, :-1]  # (N, L-1, V)
            targets = tokens[:, 1:]  # (N, L-1)
            ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
            ce = ce.view_as(targets)  # (N, L-1)
            loss = ce.mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            with torch.no_grad():
                hits = (logits.argmax(-1) == targets)[repeat].float().mean()
                values = torch.stack([loss.detach(), ce[repeat].mean(), hits]).tolist()
            step = self._steps_done
            self._steps_done += 1
        return InductionStep(step=step, loss=values[0], accuracy=values[2], tokens=labels,
                             repeat_loss=values[1])
