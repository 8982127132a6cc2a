"""A PyTorch Lightning ``Callback`` that watches the ``LightningModule`` being fitted.

    from attnscope.integrations.lightning import AttnscopeCallback
    trainer = L.Trainer(max_steps=1000, callbacks=[AttnscopeCallback(port=8000)])
    trainer.fit(module, loader)   # the dashboard's URL is printed; steps carry the loss
"""

from __future__ import annotations

from typing import Any

try:  # the unified package first, then the standalone one
    from lightning.pytorch import Callback
except ImportError:
    from pytorch_lightning import Callback

from ._common import DashboardOwner


class AttnscopeCallback(Callback):
    """Starts a dashboard on the fitted module (global rank 0 only), marks every training
    batch with its loss (``training_step``'s returned loss, else the logged
    ``loss``/``train_loss``), and closes the dashboard when fitting ends.

    ``dashboard``: use this one instead of starting one (it is then left open).
    Other keyword arguments go to ``Dashboard.start``.
    """

    def __init__(self, dashboard: Any = None, **start_kwargs: Any) -> None:
        super().__init__()
        self.owner = DashboardOwner(dashboard, **start_kwargs)

    @property
    def dashboard(self) -> Any:
        """The dashboard watching the module (None before fitting starts)."""
        return self.owner.dashboard

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.owner.open(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            metrics = trainer.callback_metrics
            loss = metrics.get("loss", metrics.get("train_loss"))
        self.owner.mark(trainer.global_step, loss)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.owner.close()
