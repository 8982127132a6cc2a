"""The transformers TrainerCallback and the Lightning Callback: a dashboard starts on the
trained model, steps carry the logged loss, the dashboard closes with training."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
import torch
import torch.nn as nn
from stream_support import small_encoder

from transformer_core.events import EventDispatcher


class Regressor(nn.Module):
    """A model a Trainer can train: keyword inputs in, ``{"loss": ...}`` out."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.encoder = small_encoder(EventDispatcher())
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        pred = self.head(self.encoder(self.inp(x))).mean((1, 2))  # (N,)
        return {"loss": ((pred - labels) ** 2).mean()}


def test_integrations_package_imports_neither_framework():
    code = ("import sys, attnscope.integrations; "
            "print(any(m.split('.')[0] in ('transformers', 'lightning', 'pytorch_lightning') "
            "for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"


def test_trainer_callback_marks_every_step_with_its_loss(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from attnscope.integrations.huggingface import AttnscopeCallback

    data = [{"x": torch.randn(5, 3), "labels": torch.tensor(1.0)} for _ in range(12)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, logging_steps=1,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    callback = AttnscopeCallback(port=0, quiet=True)
    seen_during = []

    class Probe(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            url = callback.dashboard.url
            seen_during.append(httpx.get(url + "/api/v1/health").json()["status"])

    trainer = transformers.Trainer(model=Regressor(), args=args, train_dataset=data,
                                   callbacks=[callback, Probe()])
    trainer.train()
    logged = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    history = callback.dashboard.run.history
    assert history.steps == [s for s, _ in logged] == [1, 2, 3]  # one point per step
    assert [v["loss"] for v in history.values] == pytest.approx([loss for _, loss in logged],
                                                               rel=1e-5)
    assert seen_during == ["ok"] * 3
    assert callback.dashboard.run.name == tmp_path.name  # named after the output dir
    with pytest.raises(httpx.HTTPError):  # closed with training (keep_open=False)
        httpx.get(callback.dashboard.url + "/api/v1/health", timeout=2)


def test_trainer_callback_shows_tokens_and_the_loss_of_every_step(tmp_path):
    """A tiny GPT-2 with a byte-level BPE tokenizer, the Trainer's default logging_steps
    (500: no loss is logged in 6 steps): every step still has its loss, the batch's tokens
    are labelled as the tokenizer decodes them, and keep_open leaves the page served."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from hf_support import CORPUS, bpe_tokenizer, tiny_gpt2

    from attnscope.integrations.huggingface import AttnscopeCallback

    tok = bpe_tokenizer()
    model = tiny_gpt2(len(tok))
    data = [{"input_ids": ids, "labels": ids} for ids in
            (tok(text, truncation=True, max_length=12, padding="max_length")["input_ids"]
             for text in CORPUS[:24])]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "gpt2-tiny"), run_name="bpe-run", max_steps=6,
        per_device_train_batch_size=4, report_to=[], use_cpu=True, save_strategy="no",
        disable_tqdm=True)
    callback = AttnscopeCallback(port=0, quiet=True, keep_open=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   processing_class=tok, callbacks=[callback])
    trainer.train()
    dash = callback.dashboard
    try:
        assert not [e for e in trainer.state.log_history if "loss" in e]  # logging_steps=500
        history = dash.run.history
        assert history.steps == [1, 2, 3, 4, 5, 6]
        assert all(v["loss"] > 0 for v in history.values)  # every step has its loss
        labels = dash.run.labels(0)
        assert len(labels) == 12 and not any("Ġ" in x or "Ċ" in x for x in labels)
        assert "".join(labels).startswith(tuple(text[:6] for text in CORPUS[:24]))
        summary = httpx.get(dash.url + "/api/v1/runs/bpe-run").json()
        assert summary["name"] == "bpe-run" and summary["status"] == "ended"
    finally:
        dash.close()


# Lightning's own deprecations and its "few dataloader workers" advice
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_lightning_callback_marks_steps_with_loss():
    try:
        import lightning.pytorch as pl
    except ImportError:
        pl = pytest.importorskip("pytorch_lightning")
    from attnscope.integrations.lightning import AttnscopeCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = Regressor()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.net(x, y)["loss"]

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.TensorDataset(torch.randn(8, 5, 3), torch.ones(8))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    losses = []

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    callback = AttnscopeCallback(port=0, quiet=True)
    trainer = pl.Trainer(max_steps=3, callbacks=[callback, Probe()], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(Module(), loader)
    history = callback.dashboard.run.history
    assert history.steps == [1, 2, 3]
    assert [v["loss"] for v in history.values] == pytest.approx(losses)
    assert callback.dashboard.run.status == "ended"


# Lightning's own deprecations and its "few dataloader workers" advice
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_lightning_callback_labels_the_batch_tokens_and_names_the_run(tmp_path):
    try:
        import lightning.pytorch as pl
    except ImportError:
        pl = pytest.importorskip("pytorch_lightning")
    pytest.importorskip("transformers")
    from hf_support import CORPUS, bpe_tokenizer, tiny_gpt2

    from attnscope.integrations.lightning import AttnscopeCallback

    tok = bpe_tokenizer()

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = tiny_gpt2(len(tok))

        def training_step(self, batch, batch_idx):
            return self.net(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    ids = tok(CORPUS[:8], truncation=True, max_length=10, padding="max_length",
              return_tensors="pt")["input_ids"]
    loader = torch.utils.data.DataLoader([{"input_ids": row} for row in ids], batch_size=4)
    callback = AttnscopeCallback(port=0, quiet=True, tokenizer=tok)
    trainer = pl.Trainer(max_steps=2, callbacks=[callback], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu",
                         default_root_dir=str(tmp_path / "lm-run"))
    trainer.fit(Module(), loader)
    run = callback.dashboard.run
    assert run.name == "lm-run" and run.history.steps == [1, 2]
    assert "".join(run.labels(0)).startswith(CORPUS[4][:8])  # the last batch, decoded
