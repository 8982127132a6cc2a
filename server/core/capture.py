"""One capture: a forward pass of a model with a private listener on its dispatchers.

Independent of the run registry: :func:`run_capture` takes a model and an input
tensor and returns named CPU tensors. The server calls it between training steps
(in the training thread), but it is safe anywhere nobody else uses the model.

"Layers" are the attention sites of the model's :class:`~attnscope.contract.layout.ModelLayout`
(the numbering the stream and the page use). For layer ``i``:

* ``attention``: ``attention.i`` (N, h, L, S), the softmax before dropout;
* ``qk_logits``: ``qk_logits.i`` (N, h, L, S), the pre-softmax scores
  (masked positions are ``-inf``);
* ``qkv``: ``queries.i`` (N, L, h, E), ``keys.i`` (N, S, h, E), ``values.i`` (N, S, h, D);
* ``intermediate``: ``intermediate.i`` (N, L, d_model), the output of the
  transformer layer that holds attention ``i`` (a decoder layer holds two
  attentions, self and cross, which then share it).

``h`` is the number of selected heads (all H by default), in the order asked.
Shape legend: N batch, L queries, S keys, H heads, E query/key dim, D value dim.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from transformer_core.events import AttentionEvent, IntermediateOutput, QKVEvent

from ..contract.layout import LocalModel, ModelLayout
from .limits import LimitError, check_indices
from .model_inputs import call_model, model_pad_id, padding_mask

logger = logging.getLogger(__name__)

KINDS = ("attention", "qkv", "qk_logits", "intermediate")

# One capture at a time per model: eval()/train() toggling must not interleave.
_model_locks: weakref.WeakKeyDictionary[nn.Module, threading.Lock] = weakref.WeakKeyDictionary()
_model_locks_guard = threading.Lock()


class CaptureError(ValueError):
    """A capture request that cannot be served for this model; ``field`` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class CaptureTooLarge(CaptureError):
    """The captured tensors would exceed the configured byte limit."""


class CaptureUnavailable(RuntimeError):
    """The process holding the model could not serve the capture: a remote run's
    publisher failed or went away (HTTP 502)."""


def check_selection(info: ModelLayout, layers: Sequence[int] | None,
                    heads: Sequence[int] | None) -> tuple[list[int], list[int] | None]:
    """Resolve ``layers`` (None = all) and validate ``heads``; raise :class:`CaptureError`."""
    try:
        layers = list(range(info.n_layers)) if layers is None else list(
            check_indices("layers", layers, info.n_layers, where="the model"))
        if heads is not None:
            counts = [(s.heads, s.index) for s in (info.sites[i] for i in layers)
                      if s.heads is not None]
            n_heads, where = min(counts) if counts else (1 << 16, None)
            heads = list(check_indices("heads", heads, n_heads, where=f"layer {where}"))
    except LimitError as exc:
        raise CaptureError(exc.field, exc.message) from None
    return layers, heads


def estimate_bytes(info: ModelLayout, n: int, length: int, kinds: Sequence[str],
                   layers: Sequence[int], heads: Sequence[int] | None) -> int:
    """Bytes of float32 tensors a capture will produce, taking S = L (self-attention)."""
    total = 0
    d_model = info.d_model or 0
    for layer in layers:
        site = info.sites[layer]
        n_heads = site.heads or 1
        h = len(heads) if heads is not None else n_heads
        e = d_model // n_heads
        if "attention" in kinds:
            total += n * h * length * length
        if "qk_logits" in kinds:
            total += n * h * length * length
        if "qkv" in kinds:
            total += 3 * n * length * h * e
        if "intermediate" in kinds:
            total += n * length * d_model
    return 4 * total


def _model_lock(model: nn.Module) -> threading.Lock:
    with _model_locks_guard:
        lock = _model_locks.get(model)
        if lock is None:
            lock = _model_locks[model] = threading.Lock()
        return lock


def _to_cpu(t: torch.Tensor) -> torch.Tensor:
    """A private CPU copy; floats as float32 (numpy has no bfloat16)."""
    t = t.detach()
    if t.is_floating_point():
        t = t.float()
    return t.to("cpu", copy=True).contiguous()


class _Collector:
    """The private handler: copies what was asked from each event it gets."""

    def __init__(self, local: LocalModel, layers: Sequence[int], kinds: Sequence[str],
                 heads: Sequence[int] | None, max_bytes: int | None) -> None:
        self.kinds = set(kinds)
        self.heads = list(heads) if heads is not None else None
        self.max_bytes = max_bytes
        self.size = 0
        self.out: dict[str, torch.Tensor] = {}
        sites = [local.sites[i] for i in layers]
        self.inner = {id(s.module): s.index for s in sites}
        self.qkv = {id(s.qkv_source): s.index for s in sites if s.qkv_source is not None}
        self.blocks: dict[int, list[int]] = {}
        for i in layers:
            block = local.blocks[i]
            if block is not None:
                self.blocks.setdefault(id(block), []).append(i)
        # Where the selected sites' events go: attention, QKV, their block's output.
        self.dispatchers: list[Any] = []
        for i in layers:
            block = local.blocks[i]
            for d in (local.sites[i].dispatcher, local.sites[i].qkv_dispatcher,
                      None if block is None else block.event_dispatcher):
                if d is not None and all(d is not x for x in self.dispatchers):
                    self.dispatchers.append(d)

    def accepts(self, event: Any) -> bool:
        source = id(getattr(event, "source", None))
        return source in self.inner or source in self.qkv or source in self.blocks

    def _put(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.out:  # a model that runs a layer twice: keep the first call
            return
        tensor = _to_cpu(tensor)
        self.size += tensor.numel() * tensor.element_size()
        if self.max_bytes is not None and self.size > self.max_bytes:
            raise CaptureTooLarge(
                "tokens", f"the capture would exceed the limit of {self.max_bytes} bytes; "
                "ask for fewer kinds, layers or heads, or a shorter input")
        self.out[name] = tensor

    def _heads(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        if self.heads is None:
            return t
        return t.index_select(dim, torch.tensor(self.heads, dtype=torch.long, device=t.device))

    def __call__(self, event: Any) -> None:
        source = id(getattr(event, "source", None))
        if isinstance(event, AttentionEvent) and source in self.inner:
            i = self.inner[source]
            if "attention" in self.kinds:
                self._put(f"attention.{i}", event.attention(heads=self.heads))  # (N, h, L, S)
            if "qk_logits" in self.kinds:
                self._put(f"qk_logits.{i}", event.logits(heads=self.heads))  # (N, h, L, S)
        elif isinstance(event, QKVEvent) and source in self.qkv and "qkv" in self.kinds:
            i = self.qkv[source]
            self._put(f"queries.{i}", self._heads(event.queries, 2))  # (N, L, h, E)
            self._put(f"keys.{i}", self._heads(event.keys, 2))  # (N, S, h, E)
            self._put(f"values.{i}", self._heads(event.values, 2))  # (N, S, h, D)
        elif isinstance(event, IntermediateOutput) and source in self.blocks \
                and "intermediate" in self.kinds:
            for i in self.blocks[source]:
                self._put(f"intermediate.{i}", event.x)  # (N, L, d_model)


def run_capture(
    model: nn.Module,
    inputs: torch.Tensor,
    kinds: Sequence[str],
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    max_bytes: int | None = None,
    local: LocalModel | None = None,
    attention_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Run the model once on ``inputs``, in eval mode without grad, and return what was asked.

    ``inputs`` is token ids (N, L) long or features (N, L, d_model); it is moved
    to the model's device and given as :func:`~attnscope.core.model_inputs.call_model` does
    (``input_ids`` / ``inputs_embeds`` to a Hugging Face model, with ``attention_mask``
    (N, L), by default where its ``pad_token_id`` pads a row; positionally otherwise).
    Returns ``{"attention.0": (N, h, L, S), ...}`` (see the module docstring for
    names and shapes), CPU tensors, float32 for floats.
    Each module's training mode is restored afterwards and the private listener
    removed, even when the forward pass fails. Raises :class:`CaptureError` for
    a bad selection or when the output would exceed ``max_bytes``. ``local``: the
    model's :class:`~attnscope.contract.layout.LocalModel` when the caller keeps one (a run does).
    """
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise CaptureError("kinds", f"unknown kinds {unknown}; expected some of {list(KINDS)}")
    local = local if local is not None and local.model is model else LocalModel(model)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        # Only this rank runs the capture: DDP's forward could start a collective
        # (buffer broadcast) that the other ranks never join.
        model = model.module
    layers, heads = check_selection(local.layout, layers, heads)
    collector = _Collector(local, layers, kinds, heads, max_bytes)
    dispatchers = collector.dispatchers
    device, dtype = local.parameters_device_dtype()
    with _model_lock(model):
        modes = {m: m.training for m in model.modules()}
        try:
            for dispatcher in dispatchers:
                dispatcher.listen(collector.accepts, collector)
            model.eval()
            if attention_mask is None and not inputs.is_floating_point():
                attention_mask = padding_mask(inputs, model_pad_id(model))
            if attention_mask is not None:
                attention_mask = attention_mask.to(device)
            with torch.no_grad():
                if inputs.is_floating_point():
                    call_model(model, inputs.to(device, dtype), attention_mask)
                else:
                    call_model(model, inputs.to(device), attention_mask)
        finally:
            for dispatcher in dispatchers:
                dispatcher.remove(collector)
            for module, mode in modes.items():
                module.training = mode
    logger.debug("captured %d tensors, %d bytes", len(collector.out), collector.size)
    return collector.out
