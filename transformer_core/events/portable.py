"""Attention events that travel between processes as plain data.

An emitter gives its :class:`~transformer_core.events.AttentionEvent` a :class:`Recipe`:
the name of the function that builds the event, its JSON-able parameters, its tensors
and its masks, all references (nothing is copied). :func:`to_portable` turns an event
(usually a :meth:`~transformer_core.events.AttentionEvent.sample_copy`, which owns its
tensors) into a :class:`Portable` of CPU tensors and JSON; :func:`from_portable` builds
the same event in another process, where reading it computes the same values. An
event without a recipe travels as its computed matrix (computed where it is made).

>>> import torch
>>> from transformer_core.attention.full_attention import softmax_event
>>> q, k = torch.randn(1, 5, 2, 4), torch.randn(1, 5, 2, 4)        # (N, L, H, E), (N, S, H, E)
>>> event = softmax_event(None, q, k, 0.5, None, None)
>>> back = from_portable(to_portable(event))
>>> back.shape, torch.allclose(back.attention(0), event.attention(0))
((1, 2, 5, 5), True)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..masking import BaseMask, FullMask, LengthMask, TriangularCausalMask, sample_rows

# recipe name -> "module:function" building the event; called as
# fn(source, **tensors, **masks, **params, role=..., attention_type=...).
BUILDERS = {
    "softmax": "transformer_core.attention.full_attention:softmax_event",
    "kernel": "transformer_core.attention.linear_attention:kernel_event",
    "sdpa": "transformer_core.instrument.lazy:sdpa_event_of",
    "softmax_step": "transformer_core.recurrent.attention._events:softmax_step_event_of",
    "kernel_step": "transformer_core.recurrent.attention._events:linear_step_event_of",
    "matrix": "transformer_core.events.portable:matrix_event",
}


@dataclass(frozen=True)
class Recipe:
    """How to build an event again: ``BUILDERS[name](source, **tensors, **masks, **params)``."""

    name: str
    params: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    masks: dict[str, BaseMask | None] = field(default_factory=dict)


@dataclass
class Portable:
    """An event as data: its recipe with CPU tensors, masks as tensors + JSON
    (:func:`mask_to_data`), and the event's shape, role and attention type."""

    recipe: str
    params: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    masks: dict[str, dict[str, Any] | None]
    shape: tuple[int, int, int, int]
    role: str
    attention_type: str
    # when its tensors are copies still arriving from a device: an object with query()
    arrival: Any = None

    def header(self) -> dict[str, Any]:
        """The JSON part (tensors travel beside it, named ``t.<name>`` and ``m.<mask>.<name>``)."""
        return {"recipe": self.recipe, "params": self.params, "shape": list(self.shape),
                "role": self.role, "attention_type": self.attention_type,
                "masks": {k: None if m is None else {"kind": m["kind"], **m["params"]}
                          for k, m in self.masks.items()}}

    def all_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"t.{k}": v for k, v in self.tensors.items()}
        for name, m in self.masks.items():
            if m is not None:
                out.update({f"m.{name}.{k}": v for k, v in m["tensors"].items()})
        return out

    @classmethod
    def from_parts(cls, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Portable:
        """The inverse of :meth:`header` + :meth:`all_tensors`; ``ValueError`` if malformed."""
        recipe = header.get("recipe")
        if recipe not in BUILDERS:
            raise ValueError(f"recipe: unknown {recipe!r}; known: {sorted(BUILDERS)}")
        shape = tuple(int(s) for s in header["shape"])
        if len(shape) != 4:
            raise ValueError(f"shape: expected (N, H, L, S), got {list(shape)}")
        masks: dict[str, dict[str, Any] | None] = {}
        for name, m in (header.get("masks") or {}).items():
            if m is None:
                masks[name] = None
                continue
            prefix = f"m.{name}."
            masks[name] = {"kind": m["kind"], "params": {k: v for k, v in m.items() if k != "kind"},
                           "tensors": {k[len(prefix):]: v for k, v in tensors.items()
                                       if k.startswith(prefix)}}
        return cls(str(recipe), dict(header.get("params") or {}),
                   {k[2:]: v for k, v in tensors.items() if k.startswith("t.")}, masks, shape,
                   str(header.get("role", "self")), str(header.get("attention_type", "full")))

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.all_tensors().values())


def _to_cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu()


def mask_to_data(mask: BaseMask | None,
                 copy: Callable[[torch.Tensor], torch.Tensor] = _to_cpu) -> dict[str, Any] | None:
    """A mask as ``{"kind", "params", "tensors"}`` (its tensors given to ``copy``: to the CPU
    by default); None stays None.

    >>> mask_to_data(TriangularCausalMask(3))["kind"], mask_to_data(FullMask(2, 3))["params"]
    ('causal', {'n': 2, 'm': 3})
    """
    if mask is None:
        return None
    if isinstance(mask, TriangularCausalMask):
        return {"kind": "causal", "params": {"n": mask.max_len}, "tensors": {}}
    if isinstance(mask, LengthMask):
        return {"kind": "lengths", "params": {"max_len": mask.max_len,
                                              "all_ones": bool(getattr(mask, "_all_ones", False))},
                "tensors": {"lengths": copy(mask.lengths)}}
    if isinstance(mask, FullMask) and mask._mask is None:
        n, m = mask.shape
        return {"kind": "ones", "params": {"n": n, "m": m}, "tensors": {}}
    return {"kind": "full", "params": {}, "tensors": {"matrix": copy(mask.bool_matrix)}}


def mask_from_data(data: dict[str, Any] | None) -> BaseMask | None:
    """The inverse of :func:`mask_to_data`."""
    if data is None:
        return None
    kind, params, tensors = data["kind"], data["params"], data["tensors"]
    if kind == "causal":
        return TriangularCausalMask(int(params["n"]))
    if kind == "ones":
        return FullMask(int(params["n"]), int(params["m"]))
    if kind == "lengths":
        mask = LengthMask.__new__(LengthMask)
        mask.lengths = tensors["lengths"].long()
        mask.max_len = int(params["max_len"])
        mask._all_ones = bool(params["all_ones"])
        return mask
    if kind == "full":
        return FullMask(tensors["matrix"].bool())
    raise ValueError(f"mask: unknown kind {kind!r}")


def to_portable(event: Any) -> Portable:
    """``event`` as data with CPU tensors (copied from a device, waiting for it). An event
    without a recipe is computed here and travels as its matrix (``"matrix"``)."""
    recipe: Recipe | None = getattr(event, "recipe", None)
    if recipe is None:
        with torch.no_grad():
            matrix = event.attention_matrix.detach().float().cpu()  # (N, H, L, S)
            logits = event.logits().detach().float().cpu()  # (N, H, L, S)
        recipe = Recipe("matrix", {}, {"matrix": matrix, "logits": logits})
    return Portable(
        recipe.name, dict(recipe.params),
        {k: v.detach().cpu() for k, v in recipe.tensors.items() if v is not None},
        {k: mask_to_data(m) for k, m in recipe.masks.items()},
        tuple(event.shape), event.role, event.attention_type)


# Masks that hold one row per sample (the others are shared by the whole batch).
PER_SAMPLE_MASKS = frozenset({"key_lengths"})


def _clone(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone()


def portable_sample(event: Any, n: int, copy: Callable[[torch.Tensor], torch.Tensor] = _clone,
                    ) -> Portable:
    """Sample ``n`` of ``event`` as data, straight from the batch's tensors: each
    batch-first tensor of its recipe sliced to ``[n : n + 1]`` and given to ``copy``
    (default: a detached clone; a training process gives a copy into host memory that
    does not wait for the device). Per-sample masks keep their row ``n``. Like
    :meth:`~transformer_core.events.AttentionEvent.sample_copy`, with no event built and
    no other op: a slice and a copy per tensor. An event without a recipe has its
    sample's matrix and logits computed here (``"matrix"``).

    >>> from transformer_core.attention.full_attention import softmax_event
    >>> q, k = torch.randn(3, 5, 2, 4), torch.randn(3, 5, 2, 4)
    >>> event = softmax_event(None, q, k, 0.5, None, None)
    >>> one = from_portable(portable_sample(event, 1))
    >>> one.shape, torch.allclose(one.attention(0), event.attention(1))
    ((1, 2, 5, 5), True)
    """
    N = event.shape[0]
    recipe: Recipe | None = getattr(event, "recipe", None)
    if recipe is None:
        with torch.no_grad():
            matrix = event.attention(slice(n, n + 1))  # (1, H, L, S)
            logits = event.logits(slice(n, n + 1))
        recipe = Recipe("matrix", {}, {"matrix": matrix, "logits": logits})
    tensors = {}
    for name, t in recipe.tensors.items():
        if t is None:
            continue
        tensors[name] = copy(t[n : n + 1] if t.ndim and t.shape[0] == N and N > 1 else t)
    # an all-ones mask known as such (no device sync to tell) travels as none
    masks = {name: None if getattr(m, "_all_ones", False) else
             mask_to_data(sample_rows(m, n) if name in PER_SAMPLE_MASKS else m, copy)
             for name, m in recipe.masks.items()}
    params = dict(recipe.params)
    if "shape" in params:
        params["shape"] = [1, *params["shape"][1:]]
    return Portable(recipe.name, params, tensors, masks, (1, *event.shape[1:]), event.role,
                    event.attention_type)


def from_portable(portable: Portable, source: Any = None) -> Any:
    """The event ``portable`` describes, emitted by ``source`` (e.g. None in another
    process); reading it computes what reading the original computed."""
    module, _, name = BUILDERS[portable.recipe].partition(":")
    build = getattr(importlib.import_module(module), name)
    masks = {k: mask_from_data(m) for k, m in portable.masks.items()}
    return build(source, **portable.tensors, **masks, **portable.params, role=portable.role,
                 attention_type=portable.attention_type)


def matrix_event(source: Any, matrix: torch.Tensor, logits: torch.Tensor | None = None, *,
                 role: str = "self", attention_type: str = "full") -> Any:
    """An event of an already computed (N, H, L, S) matrix and its logits (when not given:
    the matrix's log, whose softmax is the matrix again)."""
    from .event import AttentionEvent

    scores = matrix.log() if logits is None else logits
    return AttentionEvent(source, tuple(matrix.shape), lambda n, h: scores[n][:, h],
                          lambda n, h: matrix[n][:, h], role=role, attention_type=attention_type,
                          matrix=matrix,
                          recipe=Recipe("matrix", {}, {"matrix": matrix, "logits": logits}))
