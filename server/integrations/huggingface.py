"""A ``transformers`` ``TrainerCallback`` that watches the model a ``Trainer`` trains.

    from attnscope.integrations.huggingface import AttnscopeCallback
    trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tok,
                      callbacks=[AttnscopeCallback(port=8000)])
    trainer.train()   # the dashboard's URL is printed; every step shows its loss and tokens

The ``Trainer`` itself needs ``accelerate`` (``pip install "attnscope[huggingface]"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase, TrainerCallback

from ._common import BatchWatch, DashboardOwner


def run_name(args: Any) -> str:
    """The run's name: the ``Trainer``'s ``run_name`` when set to something else than its
    output dir, else the output dir's last folder.

    >>> from types import SimpleNamespace as A
    >>> run_name(A(run_name=None, output_dir="out/gpt2-tiny")), run_name(A(run_name="lr3e-4",
    ...                                                                    output_dir="out"))
    ('gpt2-tiny', 'lr3e-4')
    """
    output = str(args.output_dir or "")
    if args.run_name and args.run_name != output:
        return str(args.run_name)
    return Path(output).resolve().name or "trainer"


class AttnscopeCallback(TrainerCallback):
    """Starts a dashboard on the trained model when training begins (on the main process
    only) and marks every optimizer step with its loss and its batch's tokens.

    - The loss of every step is read from the model's output after its backward (as
      the Trainer's own NaN check does), not only every ``logging_steps``.
    - Token labels: the batch's ``input_ids``, shown as the tokenizer decodes them
      (``tokenizer=`` here, else the Trainer's ``processing_class``).
    - The run is named after ``args.run_name``, else the output dir (``name=`` overrides).
    - ``keep_open``: when training ends, the dashboard closes (False, the default: it
      prints where the run stays browsable, ``attnscope serve``), or only marks the run
      ended and keeps serving the page until ``callback.dashboard.close()`` or the
      process exits (True: for notebooks).

    ``dashboard``: use this one instead of starting one (it is then left open).
    Other keyword arguments go to ``Dashboard.start`` (``port``, ``tokenizer``...).
    """

    def __init__(self, dashboard: Any = None, *, keep_open: bool = False,
                 **start_kwargs: Any) -> None:
        self.owner = DashboardOwner(dashboard, **start_kwargs)
        self.keep_open = keep_open
        self.batch = BatchWatch()
        self._loss: float | None = None
        self._step_losses = False  # the model returned a loss: steps carry it

    @property
    def dashboard(self) -> Any:
        """The dashboard watching the model (None before training begins)."""
        return self.owner.dashboard

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or model is None:
            return
        tokenizer = kwargs.get("processing_class") or kwargs.get("tokenizer")
        self.owner.open(model, name=run_name(args),
                        tokenizer=tokenizer if isinstance(tokenizer, PreTrainedTokenizerBase)
                        else None)
        self.batch.attach(model)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._loss = self.batch.loss()  # after the backward: no extra wait on the device

    def on_step_end(self, args, state, control, **kwargs):
        loss = self._loss if self._loss is not None else self.batch.loss()
        self._loss = None
        self._step_losses = self._step_losses or loss is not None
        self.owner.mark(state.global_step, loss, tokens=self.batch.tokens)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # A model that returns no loss of its own (a custom compute_loss): the logged one.
        if not self._step_losses and logs and "loss" in logs:
            self.owner.mark(state.global_step, logs["loss"])

    def on_train_end(self, args, state, control, **kwargs):
        self.batch.detach()
        self.owner.close(keep_open=self.keep_open)
