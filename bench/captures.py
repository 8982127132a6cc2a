"""Benchmark scripted captures: capture latency and download throughput.

Measures, in one process, with the captures API served by a real uvicorn on a
loopback port (median and minimum of ``--repeats``):

1. capture latency, batch 1, kinds ``attention`` (and all four kinds):
   * the demo model (2 layers, 4 heads, d_model 64, L = 24);
   * a 12-layer, 12-head, d_model 768 encoder (BERT-base sizes, built with
     ``TransformerEncoderBuilder`` plus an ``nn.Embedding``) at L = 512;
   each as: a plain forward (eval, no grad, no listener) for reference,
   ``run_capture`` (forward + private listener + copies), and the whole
   ``POST /api/v1/captures`` (validation, capture, safetensors write + fsync,
   index commit, response);
2. download throughput of the large model's attention capture (12 x 12 x 512 x
   512 float32 = 144 MiB) as ``npz`` and ``safetensors`` over loopback HTTP.

Usage: ``python bench/captures.py [--repeats 5] [--threads N] [--device cpu|cuda|auto]``;
prints markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import uvicorn  # noqa: E402
from fastapi import FastAPI  # noqa: E402

from attnscope.backend.captures.requests import CaptureLimits  # noqa: E402
from attnscope.backend.captures.router import build_router  # noqa: E402
from attnscope.backend.captures.store import CaptureStore  # noqa: E402
from attnscope.core.capture import run_capture  # noqa: E402
from attnscope.training.demo import DemoConfig, DemoModel, resolve_device  # noqa: E402
from attnscope.training.run import Run, RunRegistry  # noqa: E402
from transformer_core.builders import TransformerEncoderBuilder  # noqa: E402
from transformer_core.events import EventDispatcher  # noqa: E402

API = "/api/v1/captures"
MiB = 1 << 20


class BertSized(nn.Module):
    """Embedding (V, 768) -> 12-layer, 12-head encoder: token ids (N, L) -> (N, L, 768)."""

    def __init__(self, vocab: int = 30522, seq_len: int = 512) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.embedding = nn.Embedding(vocab, 768)
        self.encoder = TransformerEncoderBuilder.from_kwargs(
            n_layers=12, n_heads=12, query_dimensions=64, value_dimensions=64,
            feed_forward_dimensions=3072, event_dispatcher=EventDispatcher()).get()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embedding(tokens))


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, float]:
    """(median, min) seconds of ``repeats`` calls after ``warmup`` untimed ones.

    The minimum is the figure to compare on a busy machine: noise only adds time.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def ms(pair: tuple[float, float]) -> str:
    return f"{pair[0] * 1e3:.1f} | {pair[1] * 1e3:.1f}"


@contextlib.contextmanager
def serve(runs: list[Run], data_dir: Path) -> Iterator[str]:
    """The captures API on a free loopback port (limits raised for the large model)."""
    registry = RunRegistry()
    for run in runs:
        registry.add(run)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.capture_store = CaptureStore(data_dir)
        yield
        app.state.capture_store.close()

    app = FastAPI(lifespan=lifespan)
    app.include_router(build_router(CaptureLimits(max_json_bytes=MiB, timeout_s=600)))
    app.state.runs = registry
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def ended_run(model: nn.Module, run_id: str) -> Run:
    run = Run(model, run_id=run_id)
    run.close()  # no training thread: captures run in the request's thread
    return run


def latency_rows(name: str, model: nn.Module, length: int, client: httpx.Client,
                 run_id: str, repeats: int) -> list[str]:
    device = next(model.parameters()).device
    tokens = torch.randint(10, (1, length))
    model.eval()

    def plain() -> None:
        with torch.no_grad():
            model(tokens.to(device))

    rows = [f"| {name} | forward only (reference) | {ms(timed(plain, repeats))} |"]
    for kinds in (["attention"], ["attention", "qkv", "qk_logits", "intermediate"]):
        label = "+".join(kinds) if len(kinds) == 1 else "all four kinds"
        direct = timed(lambda k=kinds: run_capture(model, tokens, k), repeats)
        body = {"run": run_id, "tokens": tokens.tolist(), "kinds": kinds}

        def post(b=body) -> None:
            r = client.post(API, json=b)
            r.raise_for_status()
            client.delete(f"{API}/{r.json()['id']}")  # keep the disk bounded

        rows.append(f"| {name} | run_capture, {label} | {ms(direct)} |")
        rows.append(f"| {name} | POST {API}, {label} | {ms(timed(post, repeats))} |")
    return rows


def download_rows(client: httpx.Client, run_id: str, repeats: int) -> list[str]:
    body = {"run": run_id, "tokens": [[1] * 512], "kinds": ["attention"]}
    meta = client.post(API, json=body).json()
    rows = []
    for fmt in ("npz", "safetensors"):
        sizes = []

        def fetch(f=fmt, sizes=sizes) -> None:
            with client.stream("GET", meta["urls"][f]) as r:
                sizes.append(sum(len(chunk) for chunk in r.iter_bytes(1 << 20)))

        median, best = timed(fetch, repeats)
        size = sizes[-1]
        rows.append(f"| {fmt} | {size / MiB:.1f} | {median * 1e3:.0f} | {best * 1e3:.0f} | "
                    f"{size / MiB / median:.0f} | {size / MiB / best:.0f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (5)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (auto)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    demo = DemoModel(DemoConfig(device=str(device)), EventDispatcher()).to(device)
    big = BertSized().to(device)
    with tempfile.TemporaryDirectory() as tmp, \
            serve([ended_run(demo, "demo"), ended_run(big, "big")], Path(tmp)) as url, \
            httpx.Client(base_url=url, timeout=600) as client:
        print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"{args.repeats} timed repetitions after 1 warm-up\n")
        print("| model | what | median ms | min ms |\n|---|---|---|---|")
        for row in latency_rows("demo (2x4, d 64), L=24", demo, 24, client, "demo", args.repeats):
            print(row)
        for row in latency_rows("12x12, d 768, L=512", big, 512, client, "big", args.repeats):
            print(row)
        print("\n| download (12x12x512x512 attention) | MiB | median ms | min ms | median MiB/s "
              "| best MiB/s |\n|---|---|---|---|---|---|")
        for row in download_rows(client, "big", args.repeats):
            print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
