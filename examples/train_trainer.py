"""Train a tiny GPT-2 with the ``transformers`` Trainer and watch it with the callback.

    pip install "attnscope[huggingface]"      # transformers and accelerate (the Trainer's)
    python examples/train_trainer.py          # then open the printed URL
    python examples/train_trainer.py --steps 300 --port 0 --keep-open

Everything is made here, no download: a byte-level BPE tokenizer (GPT-2's kind, whose
tokens read "Ġcat" and "Ċ" inside; the page shows " cat" and a newline) trained on a
few generated sentences in milliseconds, and a 4-layer, 4-head GPT-2 from a config.
The page shows the batch's tokens on the heatmaps' axes and the loss of every step.
With ``--keep-open`` the page stays served after training (until Ctrl-C); without it
the dashboard closes with training and prints how to browse the run afterwards.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import time

import torch
import transformers
from toy_text import sentences, tokenizer

from attnscope.integrations.huggingface import AttnscopeCallback


class Pace(transformers.TrainerCallback):
    """Waits ``seconds`` after each step, so the heads can be watched forming."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_step_end(self, args, state, control, **kwargs):
        if self.seconds:
            time.sleep(self.seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--sleep", type=float, default=0.05, help="seconds between steps")
    parser.add_argument("--keep-open", action="store_true",
                        help="keep the page served after training (until Ctrl-C)")
    parser.add_argument("--output-dir", default="out/gpt2-trainer",
                        help="the Trainer's output dir (the run is named after it)")
    args = parser.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(0)
    tok = tokenizer()
    texts = [" ".join(s.strip() for s in sentences(6, seed=i)) for i in range(512)]  # > 32 tokens
    data = [{"input_ids": ids, "labels": ids}
            for ids in tok(texts, truncation=True, max_length=32, padding="max_length")
            ["input_ids"]]
    config = transformers.GPT2Config(n_layer=4, n_head=4, n_embd=64, n_positions=64,
                                     vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    model = transformers.GPT2LMHeadModel(config)
    training = transformers.TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=8,
        learning_rate=3e-3, report_to=[], use_cpu=not torch.cuda.is_available(),
        save_strategy="no", disable_tqdm=True)
    callback = AttnscopeCallback(port=args.port, keep_open=args.keep_open)
    trainer = transformers.Trainer(model=model, args=training, train_dataset=data,
                                   processing_class=tok, callbacks=[callback, Pace(args.sleep)])
    trainer.train()
    if args.keep_open:
        print("training done; the page stays open (Ctrl-C to stop)", flush=True)
        try:
            for _ in itertools.count():
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        callback.dashboard.close()


if __name__ == "__main__":
    main()
