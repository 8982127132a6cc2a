"""A PyTorch Lightning ``Callback`` that watches the ``LightningModule`` being fitted.

    from attnscope.integrations.lightning import AttnscopeCallback
    trainer = L.Trainer(max_steps=1000, callbacks=[AttnscopeCallback(port=8000)])
    trainer.fit(module, loader)   # the dashboard's URL is printed; steps carry the loss
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

try:  # the unified package first, then the standalone one
    from lightning.pytorch import Callback
except ImportError:
    from pytorch_lightning import Callback

from ._common import DashboardOwner, batch_tokens


def run_name(trainer: Any) -> str:
    """The run's name: the logger's ``name/version_N`` when there is a logger, else the
    trainer's root dir's last folder."""
    logger = trainer.logger
    if logger is not None and logger.name:
        return f"{logger.name}/version_{logger.version}" if logger.version is not None \
            else str(logger.name)
    return Path(trainer.default_root_dir).resolve().name or "lightning"


class AttnscopeCallback(Callback):
    """Starts a dashboard on the fitted module (global rank 0 only) and marks every
    training batch with its loss (``training_step``'s returned loss, else the logged
    ``loss``/``train_loss``) and its tokens (the batch's ``input_ids``, or the batch or
    its first element when that is an integer (N, L) tensor; labelled with
    ``tokenizer=`` when given).

    The run is named after the logger (``name/version_N``), else the root dir (``name=``
    overrides). ``keep_open``: as for the ``transformers`` callback (default False: the
    dashboard closes when fitting ends and says where the run stays browsable).
    ``dashboard``: use this one instead of starting one (it is then left open). Other
    keyword arguments go to ``Dashboard.start``.
    """

    def __init__(self, dashboard: Any = None, *, keep_open: bool = False,
                 **start_kwargs: Any) -> None:
        super().__init__()
        self.owner = DashboardOwner(dashboard, **start_kwargs)
        self.keep_open = keep_open

    @property
    def dashboard(self) -> Any:
        """The dashboard watching the module (None before fitting starts)."""
        return self.owner.dashboard

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.owner.open(pl_module, name=run_name(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            metrics = trainer.callback_metrics
            loss = metrics.get("loss", metrics.get("train_loss"))
        self.owner.mark(trainer.global_step, loss, tokens=batch_tokens(batch))

    def on_fit_end(self, trainer, pl_module) -> None:
        self.owner.close(keep_open=self.keep_open)
