"""Train the demo model and publish it to a running dashboard (``attnscope serve``).

    ATTNSCOPE_TOKEN=... python examples/train_remote.py --url http://host:8000 --run-id a/b

Under torchrun the model is wrapped in DistributedDataParallel (gloo on CPU, NCCL on
GPUs); rank 0 publishes unless ``--ranks all`` (then every rank, as ``RUN/rank-N``).
``--steps 0`` trains until stopped (Ctrl-C).
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch
import torch.distributed as dist

from attnscope import Dashboard
from attnscope.training.demo import DemoConfig, DemoTraining


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("ATTNSCOPE_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--run-id", default="example/reverse", help="run id on the dashboard")
    parser.add_argument("--steps", type=int, default=0, help="steps to train (0: until stopped)")
    parser.add_argument("--ranks", default="0", help='ranks that publish: "0", "0,1" or "all"')
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds to wait between steps")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seq-len", type=int, default=24)
    return parser.parse_args()


def _ranks(text: str) -> int | list[int] | str:
    if text == "all":
        return text
    ranks = [int(r) for r in text.split(",")]
    return ranks[0] if len(ranks) == 1 else ranks


def main() -> int:
    args = _args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = args.device
    if distributed and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    training = DemoTraining(DemoConfig(device=device, seq_len=args.seq_len))
    if distributed:  # DemoTraining steps self.model: wrap it in place
        training.model = torch.nn.parallel.DistributedDataParallel(training.model)
    dash = Dashboard.connect(training.model, args.url, run=args.run_id,
                             ranks=_ranks(args.ranks), config={"seq_len": args.seq_len},
                             symbols=training.task.symbols)
    try:
        step = 0
        while args.steps <= 0 or step < args.steps:
            result = training.step()
            dash.step(result.step, loss=result.loss, accuracy=result.accuracy,
                      tokens=result.tokens)
            step += 1
            if args.sleep:
                time.sleep(args.sleep)
    except KeyboardInterrupt:
        pass
    finally:
        dash.close()
        if distributed:
            # Wait for every rank (rank 0 may still be flushing its dashboard): a rank
            # tearing gloo down while another still uses it aborts the process.
            dist.barrier()
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
