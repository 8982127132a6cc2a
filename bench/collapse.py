"""How far ahead of the loss spike do the alerts fire? The collapse demo over several seeds.

For each seed, the collapse demo (:mod:`attnscope.training.collapse`: a causal model whose
learning rate rises by 2 % a step after 100 steady ones) trains on the CPU, recorded
by a :class:`~attnscope.backend.history.writer.HistoryWriter` at its defaults (head
statistics every step: the run has no cost budget here, so nothing is thinned and
every step is evaluated), and the alerts come from its writer thread, as on the page.

* **loss spike**: the first step after the steady phase whose loss exceeds 1.2 x the
  median of the 50 steps before it;
* **first alert**: the first entropy alert (``entropy_drop``, ``entropy_floor`` and
  their layer forms), with its rule and head;
* **lead**: spike step - alert step (positive: the alert came first).

    .venv/bin/python bench/collapse.py                 # seeds 0-7 (~2 min)
    .venv/bin/python bench/collapse.py --seeds 0 1     # quick
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

ENTROPY_RULES = ("entropy_drop", "entropy_floor", "layer_entropy_drop", "layer_entropy_floor")
SPIKE_FACTOR = 1.2
SPIKE_WINDOW = 50


def loss_spike(losses: list[float], after: int) -> int | None:
    """The first step past ``after`` whose loss exceeds SPIKE_FACTOR x the median of the
    SPIKE_WINDOW steps before it (a non-finite loss counts), or None."""
    for step in range(max(after, SPIKE_WINDOW), len(losses)):
        before = statistics.median(losses[step - SPIKE_WINDOW: step])
        if not math.isfinite(losses[step]) or losses[step] > SPIKE_FACTOR * before:
            return step
    return None


def one_seed(seed: int, max_steps: int) -> dict:
    from attnscope.backend.history.store import HistoryStore
    from attnscope.backend.history.writer import HistoryWriter
    from attnscope.core.history_config import HistoryConfig
    from attnscope.training.collapse import CollapseConfig, CollapseTraining
    from attnscope.training.run import Run
    from transformer_core.events import EventDispatcher

    config = CollapseConfig(seed=seed, device="cpu")
    training = CollapseTraining(config, event_dispatcher=EventDispatcher())
    run = Run(training.model, run_id=f"collapse{seed}", symbols=training.task.symbols,
              max_overhead=None)
    losses: list[float] = []
    with tempfile.TemporaryDirectory() as data:
        service = HistoryWriter(HistoryStore(data), HistoryConfig())
        try:
            service.attach(run)
            for _ in range(max_steps):
                result = training.step()
                run.step(result.step, loss=result.loss, lr=result.lr)
                losses.append(result.loss)
                spike = loss_spike(losses, config.steady_steps)
                if spike is not None and result.step >= spike + 20:
                    break
            service.flush(60)
            alerts = service.store.alerts(service.session_of(run.id))
        finally:
            service.close()
    spike = loss_spike(losses, config.steady_steps)
    first = next((a for a in alerts if a["rule"] in ENTROPY_RULES), None)
    return {"seed": seed, "spike": spike, "first": first, "alerts": alerts,
            "lr_at_spike": None if spike is None else
            config.lr * config.lr_growth ** max(0, spike - config.steady_steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    parser.add_argument("--max-steps", type=int, default=600)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("attnscope.backend.alerts").setLevel(logging.ERROR)  # one line per alert
    print(f"load: {os.getloadavg()}, torch {torch.__version__}, 1 torch thread")
    leads = []
    for seed in args.seeds:
        r = one_seed(seed, args.max_steps)
        first = r["first"]
        where = "-" if first is None else \
            f"step {first['step']} {first['rule']} L{first['layer']}" + \
            ("" if first["head"] is None else f" H{first['head']}")
        lead = None if first is None or r["spike"] is None else r["spike"] - first["step"]
        if lead is not None:
            leads.append(lead)
        rules = sorted({a["rule"] for a in r["alerts"]})
        lr = "-" if r["lr_at_spike"] is None else f"{r['lr_at_spike']:.3f}"
        print(f"seed {seed}: first entropy alert {where}; loss spike at step {r['spike']} "
              f"(lr {lr}); lead {lead} steps; {len(r['alerts'])} alerts ({', '.join(rules)})",
              flush=True)
    if leads:
        print(f"lead over {len(leads)} seeds: median {statistics.median(leads)}, "
              f"min {min(leads)}, max {max(leads)} steps")


if __name__ == "__main__":
    main()
