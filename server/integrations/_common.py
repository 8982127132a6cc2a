"""What both training-framework callbacks share: one dashboard, started once."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


class DashboardOwner:
    """Starts a dashboard on the trained model (unless given one) and closes the one it
    started. ``start_kwargs`` go to :meth:`~attnscope.dashboard.Dashboard.start`."""

    def __init__(self, dashboard: Any = None, **start_kwargs: Any) -> None:
        self.dashboard = dashboard
        self._owned = False
        self._start_kwargs = start_kwargs

    def open(self, model: nn.Module) -> None:
        """Start the dashboard on ``model``, unless one was given or already started."""
        if self.dashboard is None:
            from ..dashboard import Dashboard

            self.dashboard = Dashboard.start(model, **self._start_kwargs)
            self._owned = True

    def mark(self, step: int, loss: Any = None) -> None:
        """``dashboard.step(step, loss=...)`` with the loss as a float (NaN shows as NaN)."""
        if self.dashboard is None:
            return
        if isinstance(loss, torch.Tensor):
            loss = float(loss.detach())
        self.dashboard.step(step, loss=None if loss is None else float(loss))

    def close(self) -> None:
        """Close the dashboard if this owner started it."""
        if self._owned and self.dashboard is not None:
            self.dashboard.close()
        self._owned = False
