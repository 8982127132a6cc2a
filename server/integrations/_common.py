"""What both training-framework callbacks share: one dashboard, started once, and what a
step shows (its loss and its batch's tokens)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn


class DashboardOwner:
    """Starts a dashboard on the trained model (unless given one) and closes the one it
    started. ``start_kwargs`` go to :meth:`~attnscope.training.dashboard.Dashboard.start`, over the
    defaults the callback found (the run's name, the trainer's tokenizer)."""

    def __init__(self, dashboard: Any = None, **start_kwargs: Any) -> None:
        self.dashboard = dashboard
        self._owned = False
        self._start_kwargs = start_kwargs

    def open(self, model: nn.Module, **defaults: Any) -> None:
        """Start the dashboard on ``model``, unless one was given or already started."""
        if self.dashboard is None:
            from ..training.dashboard import Dashboard

            given = {k: v for k, v in defaults.items() if v is not None}
            self.dashboard = Dashboard.start(model, **{**given, **self._start_kwargs})
            self._owned = True

    def mark(self, step: int, loss: Any = None, tokens: Any = None) -> None:
        """``dashboard.step(step, loss=..., tokens=...)`` with the loss as a float (NaN shows
        as NaN)."""
        if self.dashboard is None:
            return
        if isinstance(loss, torch.Tensor):
            loss = float(loss.detach())
        self.dashboard.step(step, loss=None if loss is None else float(loss), tokens=tokens)

    def close(self, keep_open: bool = False) -> None:
        """Close the dashboard if this owner started it; with ``keep_open`` only mark its run
        ended and leave the page served (until ``dashboard.close()`` or the process ends)."""
        if self._owned and self.dashboard is not None:
            if keep_open:
                self.dashboard.end_run()
                return
            self.dashboard.close()
        self._owned = False


def batch_tokens(batch: Any) -> torch.Tensor | None:
    """The (N, L) token ids of a training batch, or None: ``input_ids`` of a mapping (a
    ``BatchEncoding``, a dict), else the batch itself or its first element when that is
    an integer (N, L) tensor.

    >>> batch_tokens({"input_ids": torch.ones(2, 3, dtype=torch.long)}).shape
    torch.Size([2, 3])
    >>> batch_tokens((torch.randn(2, 3), torch.ones(2))) is None
    True
    """
    if isinstance(batch, Mapping):
        batch = batch.get("input_ids")
    elif isinstance(batch, Sequence) and not isinstance(batch, str) and batch:
        batch = batch[0]
    if isinstance(batch, torch.Tensor) and batch.ndim == 2 and not batch.is_floating_point() \
            and batch.dtype != torch.bool:
        return batch
    return None


class BatchWatch:
    """Hooks on the trained model that keep, during training forwards only, a reference to
    the batch's ``input_ids`` and to each micro-batch's loss (no copy, no device sync):
    :meth:`loss` reads the step's loss once its backward is done.

    A ``transformers`` model given ``num_items_in_batch`` returns each micro-batch's share
    of the step's loss (their sum is the step's); otherwise each is a mean (averaged).
    """

    def __init__(self) -> None:
        self.tokens: torch.Tensor | None = None
        self._losses: list[torch.Tensor] = []
        self._summed = False
        self._handles: list[Any] = []

    def attach(self, model: nn.Module) -> None:
        self.detach()
        self._handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                         model.register_forward_hook(self._after, with_kwargs=True)]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _before(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if not module.training or not torch.is_grad_enabled():
            return  # evaluation, and the dashboard's own probe and capture passes
        tokens = batch_tokens(kwargs) if "input_ids" in kwargs else batch_tokens(args)
        if tokens is not None:
            self.tokens = tokens
        self._summed = kwargs.get("num_items_in_batch") is not None

    def _after(self, module: nn.Module, args: tuple, kwargs: dict[str, Any],
               output: Any) -> None:
        if not module.training or not torch.is_grad_enabled():
            return
        loss = output.get("loss") if isinstance(output, Mapping) else None
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._losses.append(loss.detach())

    def loss(self) -> float | None:
        """The loss of the micro-batches since the last call (None: the model returned none)."""
        losses, self._losses = self._losses, []
        if not losses:
            return None
        total = torch.stack([x.reshape(()).float() for x in losses]).sum()
        return float(total if self._summed else total / len(losses))
