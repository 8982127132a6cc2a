"""Transformer builders: encoders and decoders, batch or recurrent, from keyword arguments.

Transformer parameters (``n_layers``, ``n_heads``...) are validated here; any
other name an attention registers (``softmax_temp``, ``clusters``, ``topk``...) is
handed to the attention builder(s). A decoder also takes ``self_<name>`` and
``cross_<name>`` to give its self- or cross-attention alone a value.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch.nn as nn

from ..transformers import ACTIVATIONS
from .attention_builders import (
    AttentionBuilder,
    BaseAttentionBuilder,
    RecurrentAttentionBuilder,
    RecurrentCrossAttentionBuilder,
)
from .base import BaseBuilder, unknown
from .params import Param, boolean, dispatcher_like, one_of, positive_int, probability


def _optional_positive(value: Any) -> bool:
    return value is None or positive_int(value)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


COMMON_PARAMS: dict[str, Param] = {
    "n_layers": Param(4, positive_int, "a positive int", "fast-transformers' default"),
    "n_heads": Param(4, positive_int, "a positive int", "fast-transformers' default"),
    "query_dimensions": Param(64, positive_int, "a positive int", "E per head, as in BERT/GPT"),
    "value_dimensions": Param(64, positive_int, "a positive int", "D per head; d_model = H * D"),
    "feed_forward_dimensions": Param(1024, positive_int, "a positive int", "4 * d_model at H=4"),
    "model_dimensions": Param(None, _optional_positive, "None or a positive int",
                              "None means n_heads * value_dimensions"),
    "activation": Param("relu", one_of(*ACTIVATIONS), f"one of {sorted(ACTIVATIONS)}",
                        "the original Transformer's"),
    "dropout": Param(0.1, probability, "a float in [0, 1)", "the original Transformer's"),
    "final_normalization": Param(True, boolean, "a bool",
                                 "post-norm stacks end with a LayerNorm in fast-transformers"),
    "event_dispatcher": Param("", dispatcher_like, "a str key or an EventDispatcher",
                              "the process-wide default dispatcher"),
}
_TYPE_REASON = "exact softmax attention on the fused kernel"
ENCODER_PARAMS: dict[str, Param] = {
    **COMMON_PARAMS,
    "attention_type": Param("full", _is_str, "a registered attention type", _TYPE_REASON),
}
DECODER_PARAMS: dict[str, Param] = {
    **COMMON_PARAMS,
    "self_attention_type": Param("full", _is_str, "a registered attention type", _TYPE_REASON),
    "cross_attention_type": Param("full", _is_str, "a registered attention type", _TYPE_REASON),
    "cross_n_heads": Param(None, _optional_positive, "None or a positive int",
                           "None means n_heads"),
    "cross_query_dimensions": Param(None, _optional_positive, "None or a positive int",
                                    "None means query_dimensions"),
    "cross_value_dimensions": Param(None, _optional_positive, "None or a positive int",
                                    "None means value_dimensions"),
    "cross_model_dimensions": Param(None, _optional_positive, "None or a positive int",
                                    "None means cross_n_heads * cross_value_dimensions"),
}


class BaseTransformerBuilder(BaseBuilder):
    """Validated transformer parameters plus attention builders keyed by prefix.

    ``ATTENTIONS`` maps a prefix (``""`` for an encoder, ``"self_"`` and
    ``"cross_"`` for a decoder) to the attention builder class for that attention,
    and to the name of the parameter holding its ``attention_type``.
    """

    PARAMS: ClassVar[dict[str, Param]] = {}
    ATTENTIONS: ClassVar[dict[str, tuple[type[BaseAttentionBuilder], str]]] = {}

    def __init__(self) -> None:
        object.__setattr__(self, "_values", {k: p.default for k, p in self.PARAMS.items()})
        object.__setattr__(self, "_attention_builders",
                           {prefix: cls() for prefix, (cls, _) in self.ATTENTIONS.items()})

    # -- parameters --------------------------------------------------------------

    def _allowed(self) -> set[str]:
        names = set(self.PARAMS)
        for builder in self._attention_builders.values():
            names.update(builder._registry.parameters)
        if len(self._attention_builders) > 1:
            names.update(f"{prefix}<attention parameter>" for prefix in self._attention_builders)
        return names

    def _targets(self, key: str) -> list[tuple[BaseAttentionBuilder, str]]:
        """The attention builders (and parameter name) a non-transformer ``key`` goes to."""
        for prefix, builder in self._attention_builders.items():
            if prefix and key.startswith(prefix) and builder.accepts(key[len(prefix):]):
                return [(builder, key[len(prefix):])]
        return [(b, key) for b in self._attention_builders.values() if b.accepts(key)]

    def __setattr__(self, key: str, value: Any) -> None:
        param = self.PARAMS.get(key)
        if param is not None:
            self._check(key, param, value)
            self._values[key] = value
            for builder, name in self._targets(key):  # e.g. query_dimensions of "linear"
                setattr(builder, name, value)
            return
        targets = self._targets(key)
        if not targets:
            raise unknown(key, self._allowed())
        for builder, name in targets:
            setattr(builder, name, value)

    def _check(self, key: str, param: Param, value: Any) -> None:
        if key in self._attention_type_params():
            builder = self._attention_builders[self._attention_type_params()[key]]
            if not builder.validate_attention_type(value):
                raise ValueError(
                    f"builder argument {key!r} must be one of "
                    f"{builder.available_attentions} or a composition such as "
                    f"'conditional-full:improved-clustered', got {value!r}")
        elif not param.check(value):
            raise ValueError(f"builder argument {key!r} must be {param.expected}, got {value!r}")

    def _attention_type_params(self) -> dict[str, str]:
        return {type_param: prefix for prefix, (_, type_param) in self.ATTENTIONS.items()}

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        values = self._values
        if key in values:
            return values[key]
        targets = self._targets(key)
        if targets:
            builder, name = targets[0]
            return builder._parameters.get(name)
        raise AttributeError(f"{type(self).__name__} has no parameter {key!r}")

    def _accepts_none_from_cli(self, key: str) -> bool:
        return key in self.PARAMS

    def _set_missing(self, key: str) -> None:
        self._values[key] = None

    def _require(self) -> None:
        """ValueError naming a parameter that must have a value and has None."""
        for key, param in self.PARAMS.items():
            if self._values[key] is None and param.default is not None:
                raise ValueError(f"builder argument {key!r} is None; it must be {param.expected}")

    # -- what get() uses -----------------------------------------------------------

    @property
    def attention(self) -> BaseAttentionBuilder:
        """The attention builder of an encoder (of the self-attention for a decoder)."""
        return next(iter(self._attention_builders.values()))

    def _inner(self, prefix: str, query_dimensions: int):
        """The inner attention built by the ``prefix`` attention builder."""
        builder = self._attention_builders[prefix]
        attention_type = self._values[self.ATTENTIONS[prefix][1]]
        overrides = {"event_dispatcher": self.event_dispatcher}
        if builder.accepts("query_dimensions"):
            # the layer's E: a feature map made for any other size would not fit
            overrides["query_dimensions"] = query_dimensions
        return builder.get(attention_type, overrides)

    @property
    def d_model(self) -> int:
        return self.model_dimensions or self.n_heads * self.value_dimensions

    def _norm(self) -> nn.Module | None:
        return nn.LayerNorm(self.d_model) if self.final_normalization else None


class BaseTransformerEncoderBuilder(BaseTransformerBuilder):
    """Builds ``n_layers`` encoder layers; subclasses name the classes (batch or recurrent)."""

    PARAMS: ClassVar[dict[str, Param]] = ENCODER_PARAMS

    def _classes(self) -> tuple[type, type, type]:
        """(attention layer, encoder layer, encoder) classes."""
        raise NotImplementedError

    def get(self) -> nn.Module:
        """Build the encoder."""
        self._require()
        AttentionLayer, EncoderLayer, Encoder = self._classes()
        d_model = self.d_model
        layers = [
            EncoderLayer(
                AttentionLayer(self._inner("", self.query_dimensions), d_model, self.n_heads,
                               d_keys=self.query_dimensions, d_values=self.value_dimensions,
                               event_dispatcher=self.event_dispatcher),
                d_model, self.feed_forward_dimensions, self.dropout, self.activation,
                event_dispatcher=self.event_dispatcher,
            )
            for _ in range(self.n_layers)
        ]
        return Encoder(layers, self._norm(), event_dispatcher=self.event_dispatcher)


class TransformerEncoderBuilder(BaseTransformerEncoderBuilder):
    """Builds a :class:`~transformer_core.transformers.TransformerEncoder`
    (d_model = n_heads * value_dimensions unless ``model_dimensions`` is set)."""

    ATTENTIONS: ClassVar = {"": (AttentionBuilder, "attention_type")}

    def _classes(self):
        from ..attention import AttentionLayer
        from ..transformers import TransformerEncoder, TransformerEncoderLayer

        return AttentionLayer, TransformerEncoderLayer, TransformerEncoder


class RecurrentEncoderBuilder(BaseTransformerEncoderBuilder):
    """Builds a recurrent encoder (one position per call, carrying a state)."""

    ATTENTIONS: ClassVar = {"": (RecurrentAttentionBuilder, "attention_type")}

    def _classes(self):
        from ..recurrent.attention import RecurrentAttentionLayer
        from ..recurrent.transformers import (
            RecurrentTransformerEncoder,
            RecurrentTransformerEncoderLayer,
        )

        return (RecurrentAttentionLayer, RecurrentTransformerEncoderLayer,
                RecurrentTransformerEncoder)


class BaseTransformerDecoderBuilder(BaseTransformerBuilder):
    """Builds ``n_layers`` decoder layers; the cross-attention may have its own heads
    and sizes (``cross_n_heads``, ``cross_query_dimensions``, ``cross_value_dimensions``,
    ``cross_model_dimensions``: the memory's feature size)."""

    PARAMS: ClassVar[dict[str, Param]] = DECODER_PARAMS

    def _classes(self) -> tuple[type, type, type, type]:
        """(self-attention layer, cross-attention layer, decoder layer, decoder) classes."""
        raise NotImplementedError

    @property
    def self_attention(self) -> BaseAttentionBuilder:
        return self._attention_builders["self_"]

    @property
    def cross_attention(self) -> BaseAttentionBuilder:
        return self._attention_builders["cross_"]

    def __getattr__(self, key: str) -> Any:
        cross = {"cross_n_heads": "n_heads", "cross_query_dimensions": "query_dimensions",
                 "cross_value_dimensions": "value_dimensions"}
        if key in cross:
            return self._values[key] or self._values[cross[key]]
        if key == "cross_model_dimensions":
            return self._values[key] or self.cross_n_heads * self.cross_value_dimensions
        return super().__getattr__(key)

    def get(self) -> nn.Module:
        """Build the decoder."""
        self._require()
        if self.cross_attention_type == "causal-linear":
            raise ValueError(
                "builder argument 'cross_attention_type' cannot be 'causal-linear': "
                "cross-attention keys are the memory, not the past"
            )
        SelfLayer, CrossLayer, DecoderLayer, Decoder = self._classes()
        d_model = self.d_model
        layers = [
            DecoderLayer(
                SelfLayer(self._inner("self_", self.query_dimensions), d_model, self.n_heads,
                          d_keys=self.query_dimensions, d_values=self.value_dimensions,
                          event_dispatcher=self.event_dispatcher),
                CrossLayer(self._inner("cross_", self.cross_query_dimensions), d_model,
                           self.cross_n_heads, d_keys=self.cross_query_dimensions,
                           d_values=self.cross_value_dimensions,
                           d_model_keys=self.cross_model_dimensions,
                           event_dispatcher=self.event_dispatcher),
                d_model, self.feed_forward_dimensions, self.dropout, self.activation,
                event_dispatcher=self.event_dispatcher,
            )
            for _ in range(self.n_layers)
        ]
        return Decoder(layers, self._norm(), event_dispatcher=self.event_dispatcher)


class TransformerDecoderBuilder(BaseTransformerDecoderBuilder):
    """Builds a :class:`~transformer_core.transformers.TransformerDecoder`."""

    ATTENTIONS: ClassVar = {"self_": (AttentionBuilder, "self_attention_type"),
                            "cross_": (AttentionBuilder, "cross_attention_type")}

    def _classes(self):
        from ..attention import AttentionLayer
        from ..transformers import TransformerDecoder, TransformerDecoderLayer

        return AttentionLayer, AttentionLayer, TransformerDecoderLayer, TransformerDecoder


class RecurrentDecoderBuilder(BaseTransformerDecoderBuilder):
    """Builds a recurrent decoder (one target position per call, carrying a state)."""

    ATTENTIONS: ClassVar = {"self_": (RecurrentAttentionBuilder, "self_attention_type"),
                            "cross_": (RecurrentCrossAttentionBuilder, "cross_attention_type")}

    def _classes(self):
        from ..recurrent.attention import RecurrentAttentionLayer, RecurrentCrossAttentionLayer
        from ..recurrent.transformers import (
            RecurrentTransformerDecoder,
            RecurrentTransformerDecoderLayer,
        )

        return (RecurrentAttentionLayer, RecurrentCrossAttentionLayer,
                RecurrentTransformerDecoderLayer, RecurrentTransformerDecoder)
