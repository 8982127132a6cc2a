"""TransformerEncoderBuilder and TransformerDecoderBuilder."""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch.nn as nn

from ..attention import ATTENTION_TYPES, AttentionLayer
from ..transformers import (
    ACTIVATIONS,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)
from .params import (
    Param,
    boolean,
    dispatcher_like,
    one_of,
    optional_callable,
    optional_positive_float,
    positive_int,
    probability,
)

COMMON_PARAMS: dict[str, Param] = {
    "n_layers": Param(4, positive_int, "a positive int", "fast-transformers' default"),
    "n_heads": Param(4, positive_int, "a positive int", "fast-transformers' default"),
    "query_dimensions": Param(64, positive_int, "a positive int", "E per head, as in BERT/GPT"),
    "value_dimensions": Param(64, positive_int, "a positive int", "D per head; d_model = H * D"),
    "feed_forward_dimensions": Param(1024, positive_int, "a positive int", "4 * d_model at H=4"),
    "activation": Param("relu", one_of(*ACTIVATIONS), f"one of {sorted(ACTIVATIONS)}",
                        "the original Transformer's"),
    "dropout": Param(0.1, probability, "a float in [0, 1)", "the original Transformer's"),
    "final_normalization": Param(True, boolean, "a bool",
                                 "post-norm stacks end with a LayerNorm in fast-transformers"),
    "event_dispatcher": Param("", dispatcher_like, "a str key or an EventDispatcher",
                              "the process-wide default dispatcher"),
}

ATTENTION_PARAMS: dict[str, Param] = {
    "attention_type": Param("full", one_of(*ATTENTION_TYPES), f"one of {sorted(ATTENTION_TYPES)}",
                            "exact softmax attention on the fused kernel"),
    "softmax_temp": Param(None, optional_positive_float, "None or a positive float",
                          "None means 1/sqrt(E)"),
    "attention_dropout": Param(0.1, probability, "a float in [0, 1)", "fast-transformers' default"),
    "feature_map": Param(None, optional_callable, "None or a factory E -> FeatureMap",
                         "None means elu(x) + 1"),
    "local_context": Param(32, positive_int, "a positive int", "fast-transformers' default window"),
}


def make_attention(attention_type: str, options: dict[str, Any], query_dimensions: int,
                   event_dispatcher) -> nn.Module:
    """Instantiate ``ATTENTION_TYPES[attention_type]`` with the options its __init__ takes."""
    cls = ATTENTION_TYPES[attention_type]
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in options.items() if k in accepted}
    if "query_dimensions" in accepted:
        kwargs["query_dimensions"] = query_dimensions
    return cls(**kwargs, event_dispatcher=event_dispatcher)


class BaseBuilder:
    """Holds validated parameters as attributes; ``get()`` builds the module.

    Parameters are read and set as attributes (``builder.n_layers = 6``).
    Unknown names and ill-typed values raise ``ValueError`` naming the argument.
    """

    PARAMS: ClassVar[dict[str, Param]] = {}

    def __init__(self) -> None:
        object.__setattr__(self, "_values", {k: p.default for k, p in self.PARAMS.items()})

    @classmethod
    def from_kwargs(cls, strict: bool = True, **kwargs: Any):
        """A builder with ``kwargs`` set; unknown keys raise unless ``strict=False``."""
        builder = cls()
        for key, value in kwargs.items():
            if key in cls.PARAMS or strict:
                setattr(builder, key, value)
        return builder

    @classmethod
    def from_dictionary(cls, dictionary: dict[str, Any], strict: bool = True):
        """Same as :meth:`from_kwargs` with the items of ``dictionary``."""
        return cls.from_kwargs(strict=strict, **dictionary)

    def __getattr__(self, key: str) -> Any:
        values = object.__getattribute__(self, "_values")
        if key in values:
            return values[key]
        raise AttributeError(f"{type(self).__name__} has no parameter {key!r}")

    def __setattr__(self, key: str, value: Any) -> None:
        param = self.PARAMS.get(key)
        if param is None:
            raise ValueError(
                f"unknown builder argument {key!r}; allowed: {', '.join(sorted(self.PARAMS))}"
            )
        if not param.check(value):
            raise ValueError(f"builder argument {key!r} must be {param.expected}, got {value!r}")
        self._values[key] = value

    def get(self) -> nn.Module:
        raise NotImplementedError


class TransformerEncoderBuilder(BaseBuilder):
    """Builds a :class:`TransformerEncoder` (d_model = n_heads * value_dimensions)."""

    PARAMS: ClassVar[dict[str, Param]] = {**COMMON_PARAMS, **ATTENTION_PARAMS}

    def get(self) -> TransformerEncoder:
        d_model = self.n_heads * self.value_dimensions
        options = {k: self._values[k] for k in ATTENTION_PARAMS}
        layers = [
            TransformerEncoderLayer(
                AttentionLayer(
                    make_attention(self.attention_type, options, self.query_dimensions,
                                   self.event_dispatcher),
                    d_model, self.n_heads, self.query_dimensions, self.value_dimensions,
                    event_dispatcher=self.event_dispatcher,
                ),
                d_model, self.feed_forward_dimensions, self.dropout, self.activation,
                event_dispatcher=self.event_dispatcher,
            )
            for _ in range(self.n_layers)
        ]
        norm = nn.LayerNorm(d_model) if self.final_normalization else None
        return TransformerEncoder(layers, norm, event_dispatcher=self.event_dispatcher)


def _prefixed(prefix: str) -> dict[str, Param]:
    return {prefix + name: param for name, param in ATTENTION_PARAMS.items()}


class TransformerDecoderBuilder(BaseBuilder):
    """Builds a :class:`TransformerDecoder`.

    Attention parameters come in two sets, ``self_*`` for the self-attention
    (``self_attention_type``, ``self_softmax_temp``, ``self_attention_dropout``,
    ...) and ``cross_*`` for the cross-attention (``cross_attention_type``, ...).
    """

    PARAMS: ClassVar[dict[str, Param]] = {
        **COMMON_PARAMS, **_prefixed("self_"), **_prefixed("cross_")
    }

    def _attention(self, prefix: str) -> nn.Module:
        options = {k: self._values[prefix + k] for k in ATTENTION_PARAMS}
        inner = make_attention(options["attention_type"], options, self.query_dimensions,
                               self.event_dispatcher)
        d_model = self.n_heads * self.value_dimensions
        return AttentionLayer(inner, d_model, self.n_heads, self.query_dimensions,
                              self.value_dimensions, event_dispatcher=self.event_dispatcher)

    def get(self) -> TransformerDecoder:
        if self.cross_attention_type == "causal-linear":
            raise ValueError(
                "builder argument 'cross_attention_type' cannot be 'causal-linear': "
                "cross-attention keys are the memory, not the past"
            )
        d_model = self.n_heads * self.value_dimensions
        layers = [
            TransformerDecoderLayer(
                self._attention("self_"), self._attention("cross_"), d_model,
                self.feed_forward_dimensions, self.dropout, self.activation,
                event_dispatcher=self.event_dispatcher,
            )
            for _ in range(self.n_layers)
        ]
        norm = nn.LayerNorm(d_model) if self.final_normalization else None
        return TransformerDecoder(layers, norm, event_dispatcher=self.event_dispatcher)
