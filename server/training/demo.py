"""The demo run: a small encoder learns to reverse a sequence of symbols.

Reversal has a known, visible answer: the output at position i is the input at
position L-1-i, so a head that does the work attends along the anti-diagonal
of its (L, S) attention matrix. The dashboard shows the heads getting there.

This module is pure training; it knows nothing about the server, which wraps
:class:`DemoTraining` in a background thread and calls :meth:`DemoTraining.step`.

>>> training = DemoTraining(DemoConfig(seq_len=6, n_symbols=5, batch_size=2, device="cpu"))
>>> inputs, targets = training.task.batch(2)
>>> bool((targets == inputs.flip(1)).all())
True
>>> result = training.step()
>>> result.step, len(result.tokens), len(result.tokens[0]), 0.0 <= result.accuracy <= 1.0
(0, 2, 6, True)

Shape legend: N batch, L sequence length (queries), S keys (= L here),
H heads, V number of symbols.

Run ``python -m attnscope.training.demo --max-seconds 180`` to train in the terminal and
print the time it takes to reach 95% token accuracy.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import string
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from transformer_core.attention import ATTENTION_TYPES
from transformer_core.builders import TransformerEncoderBuilder
from transformer_core.events import EventDispatcher, dispatching_to

logger = logging.getLogger(__name__)

# Short, distinct labels for the axes of the dashboard's heatmaps.
_ALPHABET = string.ascii_uppercase + string.ascii_lowercase + string.digits

# Attention types the demo accepts: the bidirectional ones that build with the
# demo's options alone. "causal-linear" and "causal-improved-clustered" are left
# out: position i must copy position L-1-i, which is in its future for half the
# sequence; the clustered types need a ``clusters`` count the demo does not pick.
# "local" gets a window of 32 keys around each query, so for sequences
# longer than ~16 the far corners are out of reach and accuracy stays below
# 100%: a visible lesson, not a bug. "linear" learns, with blurrier heads.
_NOT_FOR_THE_DEMO = {"causal-linear", "causal-improved-clustered", "clustered",
                     "improved-clustered"}
DEMO_ATTENTION_TYPES = tuple(t for t in ATTENTION_TYPES if t not in _NOT_FOR_THE_DEMO)
# Options an attention type needs from the builder beyond the demo's sizes.
_TYPE_OPTIONS: dict[str, dict] = {"local": {"local_context": 32}}


def symbol_labels(n_symbols: int) -> list[str]:
    """Labels of token ids 0..n_symbols-1: "A".."Z", "a".."z", "0".."9", then "#62", ...

    >>> symbol_labels(3), symbol_labels(64)[-3:]
    (['A', 'B', 'C'], ['9', '#62', '#63'])
    """
    return [_ALPHABET[i] if i < len(_ALPHABET) else f"#{i}" for i in range(n_symbols)]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_ints(config: Any, ranges: dict[str, tuple[int, int]]) -> None:
    """``ValueError`` naming the first field of ``config`` that is not an int in its
    ``[low, high]``."""
    for name, (low, high) in ranges.items():
        value = getattr(config, name)
        if not _is_int(value) or not low <= value <= high:
            raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")


def check_numbers(config: Any, ranges: dict[str, tuple[float, float]]) -> None:
    """``ValueError`` naming the first field of ``config`` that is not a finite number in
    its ``(low, high]``."""
    for name, (low, high) in ranges.items():
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value) or not low < value <= high:
            raise ValueError(f"{name} must be a number in ({low:g}, {high:g}], got {value!r}")


@dataclass
class DemoConfig:
    """Settings of the demo run; :meth:`validate` raises ``ValueError`` naming a bad field.

    The defaults reach 95% held-out token accuracy in about 50 steps, under a
    second on two CPU cores (``python -m attnscope.training.demo --threads 2``); sequence
    lengths 16-32 and 1-2 layers take 15-60 steps.
    """

    # 24 symbols: a 24 x 24 heatmap is big enough to see the anti-diagonal, small
    # enough to train in seconds; the issue asks for 16-32.
    seq_len: int = 24
    # 16 symbols: enough that copying the wrong position is visibly wrong (a random
    # guess scores 1/16), few enough that every label is one letter (A..P).
    n_symbols: int = 16
    # 1 layer: reversal is one routing step. With 2, layer 0 does the routing and
    # layer 1 stays near-uniform; with 1, every head on the dashboard is one that
    # converges to the anti-diagonal (which layer routes is the model's choice).
    n_layers: int = 1
    # 4 heads: a 2 x 2 grid of heatmaps per layer; some heads route, others idle.
    n_heads: int = 4
    # 16 dims per head: d_model = 64, plenty for 16 symbols x 24 positions.
    d_head: int = 16
    # 128 = 2 x d_model: the task is routing, not computation; a small MLP is faster.
    feed_forward: int = 128
    # 64 sequences x 24 tokens = 1536 targets per step: a low-noise gradient at a
    # step cost of a few ms on CPU.
    batch_size: int = 64
    # Adam at 3e-3: 95% in ~50 steps (under a second on 2 CPU cores). 1e-2 also
    # works (~20 steps), but then the heads jump to the answer in a few frames.
    lr: float = 3e-3
    # Linear warm-up over the first steps: the heads drift away from uniform over
    # a few dozen frames instead of snapping; costs ~15 steps to 95%.
    warmup_steps: int = 30
    # A fixed seed: the same demo every time (restart replays it).
    seed: int = 0
    # "auto": CUDA when there is a GPU, else the CPU.
    device: str = "auto"
    # Exact softmax attention: its matrix is the sharpest picture of the routing.
    attention_type: str = "full"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field with a bad value."""
        check_ints(self, {
            "seq_len": (4, 512),
            "n_symbols": (2, 4096),
            "n_layers": (1, 24),
            "n_heads": (1, 64),
            "d_head": (1, 512),
            "feed_forward": (1, 16384),
            "batch_size": (1, 65536),
            "warmup_steps": (0, 1_000_000),
        })
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        check_numbers(self, {"lr": (0, 1)})
        if self.attention_type not in DEMO_ATTENTION_TYPES:
            raise ValueError(
                f"attention_type must be one of {list(DEMO_ATTENTION_TYPES)}, got "
                f"{self.attention_type!r} ('causal-linear' cannot see the positions it must copy)"
            )
        resolve_device(self.device)

    @property
    def d_model(self) -> int:
        """Width of the model: n_heads * d_head."""
        return self.n_heads * self.d_head

    def to_dict(self) -> dict:
        """The fields as a plain dict (for run summaries)."""
        return asdict(self)


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda if available else cpu; otherwise a device torch accepts and has.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if not isinstance(device, str):
        raise ValueError(f"device must be a str such as 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"device must be 'auto' or a torch device, got {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but CUDA is not available")
    if resolved.type == "cuda" and resolved.index is not None \
            and resolved.index >= torch.cuda.device_count():
        raise ValueError(
            f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) available"
        )
    return resolved


class ReverseTask:
    """Random sequences of ``seq_len`` symbols and their reversals.

    Symbols are drawn uniformly and independently, so the only way to be right
    more often than 1/V is to copy the input from the mirrored position:
    ``targets[:, i] == inputs[:, L - 1 - i]``. Batches are drawn on the CPU from
    ``generator`` (a fresh one seeded with ``config.seed`` if None), so a run is
    reproducible whatever the device.
    """

    def __init__(self, config: DemoConfig, generator: torch.Generator | None = None) -> None:
        config.validate()
        self.seq_len = config.seq_len
        self.n_symbols = config.n_symbols
        self.symbols: list[str] = symbol_labels(config.n_symbols)
        if generator is None:
            generator = torch.Generator().manual_seed(config.seed)
        self.generator = generator

    def batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (N, L) and targets (N, L), both long token ids on the CPU."""
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        inputs = torch.randint(
            self.n_symbols, (batch_size, self.seq_len), generator=self.generator
        )  # (N, L)
        return inputs, inputs.flip(1)

    def labels(self, token_ids: torch.Tensor) -> list[list[str]]:
        """Token ids (N, L) -> their labels, one list of L strings per sequence."""
        if token_ids.ndim != 2:
            raise ValueError(f"token_ids: expected shape (N, L), got {tuple(token_ids.shape)}")
        symbols = self.symbols
        return [[symbols[i] for i in row] for row in token_ids.tolist()]


class DemoModel(nn.Module):
    """Token embedding + learned positional embedding -> encoder -> linear head.

    Attributes: ``embedding`` (V, d_model), ``position`` (L, d_model),
    ``encoder`` (a :class:`~transformer_core.transformers.TransformerEncoder`
    from :class:`~transformer_core.builders.TransformerEncoderBuilder`, every
    layer talking to ``event_dispatcher``) and ``head`` (d_model -> V).
    Dropout is off: the task is noiseless and dropout only slows learning.
    """

    def __init__(self, config: DemoConfig, event_dispatcher: str | EventDispatcher = "") -> None:
        super().__init__()
        config.validate()
        d_model = config.d_model
        self.seq_len = config.seq_len
        self.d_model = d_model
        self.embedding = nn.Embedding(config.n_symbols, d_model)
        self.position = nn.Embedding(config.seq_len, d_model)
        self.encoder = TransformerEncoderBuilder.from_kwargs(
            n_layers=config.n_layers,
            n_heads=config.n_heads,
            query_dimensions=config.d_head,
            value_dimensions=config.d_head,
            feed_forward_dimensions=config.feed_forward,
            attention_type=config.attention_type,
            dropout=0.0,
            attention_dropout=0.0,
            event_dispatcher=event_dispatcher,
            **_TYPE_OPTIONS.get(config.attention_type, {}),
        ).get()
        self.head = nn.Linear(d_model, config.n_symbols)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (N, L) long -> logits (N, L, V); L may be at most ``seq_len``."""
        if tokens.ndim != 2 or tokens.shape[1] > self.seq_len:
            raise ValueError(
                f"tokens: expected shape (N, L) with L <= {self.seq_len}, got {tuple(tokens.shape)}"
            )
        positions = torch.arange(tokens.shape[1], device=tokens.device)  # (L,)
        x = self.embedding(tokens) + self.position(positions)  # (N, L, d_model)
        return self.head(self.encoder(x))  # (N, L, V)

    def reset_parameters(self, seed: int) -> None:
        """Re-initialise every parameter in place, deterministically from ``seed``.

        In place, so modules keep their identity: filters such as
        ``from_layer(model.encoder.layers[1])`` stay valid across a restart.
        The global RNG is left as it was.
        """
        reset_seeded(self, seed)


def reset_seeded(model: nn.Module, seed: int) -> None:
    """Re-initialise every submodule of ``model`` that can (``reset_parameters``), in place,
    from ``seed``; the global RNG (CPU, and the model's CUDA device) is left as it was."""
    device = next(model.parameters()).device
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        for module in model.modules():
            if module is not model and hasattr(module, "reset_parameters"):
                module.reset_parameters()


@dataclass
class StepResult:
    """What one optimisation step reports.

    ``step`` is the 0-based index of the step, ``loss`` the mean cross-entropy
    of the batch, ``accuracy`` its token accuracy, ``tokens`` the labels of its
    inputs (N lists of L strings), for the dashboard's axes.
    """

    step: int
    loss: float
    accuracy: float
    tokens: list[list[str]]


class SeededTraining:
    """What the demos' trainings share: a model and task built on ``config.device``, steps
    counted, :meth:`reset` back to the seed, and a re-entrant lock that serialises
    :meth:`step`, :meth:`reset` (callable from another thread while training runs) and
    an event handler inside a step calling back (``evaluate``).

    Subclasses pass how to build their model and task, and define :meth:`_init_state`
    (parameters, task and optimiser from the seed; ``_steps_done = 0``) and ``step``.
    """

    def __init__(self, config: Any, make_model: Callable[[], nn.Module],
                 make_task: Callable[[], Any]) -> None:
        config.validate()
        self.config = config
        self.device = resolve_device(config.device)
        self.model = make_model().to(self.device)
        self.task = make_task()
        self._lock = threading.RLock()
        self._init_state()

    @property
    def steps_done(self) -> int:
        """How many optimisation steps have been taken since start or the last reset."""
        return self._steps_done

    def _init_state(self) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        """Start over: parameters, optimiser, data stream and step counter as at creation.

        The model object and its modules are kept (re-initialised in place), so
        listeners and layer filters on them stay valid.
        """
        with self._lock:
            self._init_state()


class DemoTraining(SeededTraining):
    """One demo run: model, optimiser, task. Pure training, knows nothing about the server.

    ``event_dispatcher`` (a key or an instance) is given to every layer of the
    model; each :meth:`step` runs exactly one forward pass, so a listener sees
    one set of events (one per layer) per step. :meth:`step`, :meth:`evaluate`
    and :meth:`reset` are serialised by a lock, so :meth:`reset` may be called
    from another thread while training runs.
    """

    def __init__(
        self, config: DemoConfig | None = None, event_dispatcher: str | EventDispatcher = ""
    ) -> None:
        config = config if config is not None else DemoConfig()

        def make_model() -> nn.Module:
            with torch.random.fork_rng(devices=[]):  # built on the CPU; init is seeded later
                return DemoModel(config, event_dispatcher)

        super().__init__(config, make_model, lambda: ReverseTask(config))

    def _init_state(self) -> None:
        self.model.reset_parameters(self.config.seed)
        self.task.generator.manual_seed(self.config.seed)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.config.lr)
        warmup = self.config.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda i: min(1.0, (i + 1) / warmup) if warmup else 1.0
        )
        self._steps_done = 0

    def reset(self) -> None:
        super().reset()
        logger.info("demo training reset (seed %d)", self.config.seed)

    def step(self) -> StepResult:
        """One optimisation step: one batch, one forward, one backward, one update."""
        with self._lock:
            inputs, targets = self.task.batch(self.config.batch_size)  # (N, L) each
            tokens = self.task.labels(inputs)
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            self.model.train()
            logits = self.model(inputs)  # (N, L, V)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            with torch.no_grad():
                accuracy = (logits.argmax(-1) == targets).float().mean()
                loss_value, accuracy_value = torch.stack([loss.detach(), accuracy]).tolist()
            step = self._steps_done
            self._steps_done += 1
        return StepResult(step=step, loss=loss_value, accuracy=accuracy_value, tokens=tokens)

    def evaluate(self, n_batches: int = 4) -> float:
        """Token accuracy on ``n_batches`` held-out batches, in eval mode, without grad.

        Its forward passes dispatch no events (listeners see training steps
        only, each with the tokens of its :class:`StepResult`). The batches
        are the same at every call (their own generator, seeded from
        ``config.seed``), so successive evaluations compare. The model's
        training mode is restored afterwards.
        """
        if not _is_int(n_batches) or n_batches < 1:
            raise ValueError(f"n_batches must be a positive int, got {n_batches!r}")
        generator = torch.Generator().manual_seed(self.config.seed + 1)
        held_out = ReverseTask(self.config, generator)
        correct = total = 0
        with self._lock, dispatching_to(self.model, EventDispatcher()):  # nobody hears it
            was_training = self.model.training
            self.model.eval()
            try:
                with torch.no_grad():
                    for _ in range(n_batches):
                        inputs, targets = held_out.batch(self.config.batch_size)
                        inputs, targets = inputs.to(self.device), targets.to(self.device)
                        correct += int((self.model(inputs).argmax(-1) == targets).sum())
                        total += targets.numel()
            finally:
                self.model.train(was_training)
        return correct / total

    def steps(
        self, max_steps: int | None = None, max_rate: float | None = None
    ) -> Iterator[StepResult]:
        """Yield the result of :meth:`step` ``max_steps`` times (forever when None).

        ``max_rate`` (steps per second, None for as fast as possible) paces the
        loop by sleeping between steps. The default demo reaches 95% in about
        50 steps, under a second on a CPU: a viewer needs it slower to watch
        the heads converge. A slow step is not made up for by a burst later.
        """
        if max_steps is not None and (not _is_int(max_steps) or max_steps < 0):
            raise ValueError(f"max_steps must be None or an int >= 0, got {max_steps!r}")
        if max_rate is not None and (isinstance(max_rate, bool) or not isinstance(
                max_rate, int | float) or not 0 < max_rate < math.inf):
            raise ValueError(f"max_rate must be None or a positive number, got {max_rate!r}")
        period = 1.0 / max_rate if max_rate is not None else 0.0
        taken = 0
        next_start = time.monotonic()
        while max_steps is None or taken < max_steps:
            if period:
                delay = next_start - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                next_start = max(next_start, time.monotonic()) + period
            yield self.step()
            taken += 1


@dataclass
class TrainReport:
    """How a :func:`train_until` run went.

    ``reached`` whether held-out accuracy hit the target; ``steps`` and
    ``seconds`` taken until then (or until the time ran out); ``accuracy`` the
    last held-out accuracy measured.
    """

    reached: bool
    steps: int
    seconds: float
    accuracy: float


def train_until(
    training: DemoTraining,
    target: float = 0.95,
    max_seconds: float = 180.0,
    check_every: int = 25,
    on_step: Callable[[StepResult], None] | None = None,
    max_rate: float | None = None,
) -> TrainReport:
    """Train until held-out accuracy reaches ``target`` or ``max_seconds`` pass.

    Held-out accuracy (:meth:`DemoTraining.evaluate`) is measured every
    ``check_every`` steps once a training batch scores ``target`` or more, so
    evaluation costs nothing before the model is close. ``on_step`` is called
    with every step's result; ``max_rate`` paces the steps as in
    :meth:`DemoTraining.steps`.
    """
    start = time.perf_counter()
    accuracy = 0.0
    last_check = -check_every
    for result in training.steps(max_rate=max_rate):
        if on_step is not None:
            on_step(result)
        elapsed = time.perf_counter() - start
        if result.accuracy >= target and result.step - last_check >= check_every:
            last_check = result.step
            accuracy = training.evaluate()
            if accuracy >= target:
                return TrainReport(True, result.step + 1, time.perf_counter() - start, accuracy)
        if elapsed >= max_seconds:
            return TrainReport(False, result.step + 1, elapsed, training.evaluate())
    raise AssertionError("unreachable: steps() is endless")  # pragma: no cover


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m attnscope.training.demo",
        description="Train the demo (reverse a sequence) in the terminal, report time to target.",
    )
    parser.add_argument("--max-seconds", type=float, default=180.0,
                        help="stop after this long even if the target is not reached (180)")
    parser.add_argument("--target", type=float, default=0.95,
                        help="held-out token accuracy to reach (0.95)")
    parser.add_argument("--max-rate", type=float, default=None,
                        help="at most this many steps per second, to watch it learn (no limit)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads(N) first (default: torch's choice)")
    defaults = DemoConfig()
    for field in fields(DemoConfig):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=type(getattr(defaults, field.name)),
                            default=getattr(defaults, field.name),
                            help=f"DemoConfig.{field.name} (%(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train in the terminal with a progress line every ~2 s; 0 if the target was reached."""
    args = _parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = DemoConfig(**{f.name: getattr(args, f.name) for f in fields(DemoConfig)})
    try:
        training = DemoTraining(config)
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    print(f"demo: reverse {config.seq_len} of {config.n_symbols} symbols on {training.device} "
          f"({torch.get_num_threads()} threads), "
          f"{config.n_layers} layer(s) x {config.n_heads} heads")
    start = last_print = time.perf_counter()
    last_step = 0

    def progress(result: StepResult) -> None:
        nonlocal last_print, last_step
        now = time.perf_counter()
        if now - last_print >= 2.0:
            rate = (result.step + 1 - last_step) / (now - last_print)
            print(f"step {result.step + 1:6d}  loss {result.loss:.4f}  "
                  f"acc {result.accuracy:.3f}  {rate:.1f} steps/s  {now - start:.1f} s", flush=True)
            last_print, last_step = now, result.step + 1

    report = train_until(training, args.target, args.max_seconds, on_step=progress,
                         max_rate=args.max_rate)
    if report.reached:
        print(f"reached {report.accuracy:.3f} held-out token accuracy (target {args.target}) "
              f"after {report.steps} steps in {report.seconds:.1f} s")
        return 0
    print(f"did not reach {args.target} in {report.seconds:.1f} s: held-out accuracy "
          f"{report.accuracy:.3f} after {report.steps} steps")
    return 1


if __name__ == "__main__":  # pragma: no cover
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
