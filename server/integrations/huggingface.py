"""A ``transformers`` ``TrainerCallback`` that watches the model a ``Trainer`` trains.

    from attnscope.integrations.huggingface import AttnscopeCallback
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[AttnscopeCallback(port=8000, tokenizer=tok)])
    trainer.train()   # the dashboard's URL is printed; steps carry the logged loss
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from ._common import DashboardOwner


class AttnscopeCallback(TrainerCallback):
    """Starts a dashboard on the trained model when training begins (on the main process
    only), marks every optimizer step and gives it the loss the ``Trainer`` logs, and
    closes the dashboard when training ends.

    ``dashboard``: use this one instead of starting one (it is then left open).
    Other keyword arguments go to ``Dashboard.start`` (``port``, ``tokenizer``...).
    """

    def __init__(self, dashboard: Any = None, **start_kwargs: Any) -> None:
        self.owner = DashboardOwner(dashboard, **start_kwargs)

    @property
    def dashboard(self) -> Any:
        """The dashboard watching the model (None before training begins)."""
        return self.owner.dashboard

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and model is not None:
            self.owner.open(model)

    def on_step_end(self, args, state, control, **kwargs):
        self.owner.mark(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.owner.mark(state.global_step, logs["loss"])

    def on_train_end(self, args, state, control, **kwargs):
        self.owner.close()
