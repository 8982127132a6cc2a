"""Load other implementations' transformer weights into ours by renaming state-dict keys.

A :class:`SimpleMapper` runs every key of a state dict through its
:class:`MappingRule` s: the first rule that matches a key gives the new
key(s) and value(s); a key no rule matches is dropped. Mappers for
``torch.nn.TransformerEncoder`` (:class:`PytorchMapper`) and for Hugging Face
BERT encoders (:class:`HugginfaceBertEncoderMapper`, spelled as fast-transformers
spells it) are ready to use:

>>> import torch.nn as nn
>>> from transformer_core.builders import TransformerEncoderBuilder
>>> layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
>>> theirs = nn.TransformerEncoder(layer, 2).eval()
>>> ours = TransformerEncoderBuilder.from_kwargs(n_layers=2, n_heads=4,
...     query_dimensions=4, value_dimensions=4, feed_forward_dimensions=32,
...     final_normalization=False).get().eval()
>>> ours.load_state_dict(PytorchMapper().map(theirs.state_dict()))
<All keys matched successfully>
>>> x = torch.rand(3, 5, 16)
>>> bool((ours(x) - theirs(x)).abs().max() < 1e-5)
True

Renaming keys is all a mapper does: outputs agree when the two models compute
the same function, i.e. post-norm layers (``norm_first=False``), the same
activation and the same LayerNorm epsilon (ours: 1e-5).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

logger = logging.getLogger(__name__)

Item = tuple[str, Any]


class MappingRule:
    """One renaming: :meth:`matches` says whether it handles a key, :meth:`apply`
    returns the (key, value) pairs that replace it (none, one or several)."""

    def matches(self, key: str) -> bool:
        raise NotImplementedError

    def apply(self, key: str, value: Any) -> list[Item]:
        raise NotImplementedError


class IdentityRule(MappingRule):
    """Matches every key and keeps it."""

    def matches(self, key: str) -> bool:
        return True

    def apply(self, key: str, value: Any) -> list[Item]:
        return [(key, value)]


class NotRule(MappingRule):
    """Keeps, unchanged, the keys ``rule`` does not match (so that, in a mapper
    without an identity rule, the keys it matches are dropped)."""

    def __init__(self, rule: MappingRule) -> None:
        self.rule = rule

    def matches(self, key: str) -> bool:
        return not self.rule.matches(key)

    def apply(self, key: str, value: Any) -> list[Item]:
        return [(key, value)]


class OrRule(MappingRule):
    """Matches when any of ``rules`` does; applies, in order, each rule that matches
    the key as renamed so far.

    >>> rule = OrRule(RegexRule("a", "b"), RegexRule("b$", "c"))
    >>> rule.apply("xa", 1), rule.matches("zz")
    ([('xc', 1)], False)
    """

    def __init__(self, *rules: MappingRule) -> None:
        self.rules = rules

    def matches(self, key: str) -> bool:
        return any(r.matches(key) for r in self.rules)

    def apply(self, key: str, value: Any) -> list[Item]:
        items = [(key, value)]
        for rule in self.rules:
            items = [out for k, v in items
                     for out in (rule.apply(k, v) if rule.matches(k) else [(k, v)])]
        return items


class RegexRule(MappingRule):
    """Replace every match of the regular expression ``search`` in a key by
    ``replace`` (a string with ``\\1``-style groups, or a function of the match, as
    :func:`re.sub` takes).

    >>> RegexRule(r"layer\\.(\\d+)\\.", r"layers.\\1.").apply("layer.3.w", 0)
    [('layers.3.w', 0)]
    """

    def __init__(self, search: str, replace: str | Callable[[re.Match], str]) -> None:
        self.pattern = re.compile(search)
        self.replace = replace

    def matches(self, key: str) -> bool:
        return self.pattern.search(key) is not None

    def apply(self, key: str, value: Any) -> list[Item]:
        return [(self.pattern.sub(self.replace, key), value)]


class PytorchAttentionWeightsRule(MappingRule):
    """Split ``nn.MultiheadAttention``'s packed input projection (``in_proj_weight``
    (3 d, d) and ``in_proj_bias`` (3 d,)) into our query, key and value projections;
    also renames the unpacked ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight``
    that ``nn.MultiheadAttention`` keeps when keys have another size."""

    _PACKED = re.compile(r"self_attn\.in_proj_(weight|bias)$")
    _SEPARATE = re.compile(r"self_attn\.([qkv])_proj_weight$")
    _NAMES = {"q": "query", "k": "key", "v": "value"}

    def matches(self, key: str) -> bool:
        return bool(self._PACKED.search(key) or self._SEPARATE.search(key))

    def apply(self, key: str, value: Any) -> list[Item]:
        separate = self._SEPARATE.search(key)
        if separate:
            name = self._NAMES[separate.group(1)]
            return [(key[: separate.start()] + f"attention.{name}_projection.weight", value)]
        packed = self._PACKED.search(key)
        prefix, kind = key[: packed.start()], packed.group(1)
        if value.shape[0] % 3:
            raise ValueError(f"{key}: expected 3 * d_model rows, got shape {tuple(value.shape)}")
        return [(f"{prefix}attention.{name}_projection.{kind}", part)
                for name, part in zip(("query", "key", "value"), value.chunk(3), strict=True)]


class SimpleMapper:
    """Map the keys of a state dict with ``rules`` (the first that matches a key wins;
    a key none matches is dropped). ``add_identity`` (default True) appends an
    :class:`IdentityRule`, so unmatched keys are kept instead.

    >>> SimpleMapper([RegexRule("^old", "new")]).map({"old.w": 1, "b": 2})
    {'new.w': 1, 'b': 2}
    """

    def __init__(self, rules: Iterable[MappingRule] = (), add_identity: bool = True) -> None:
        self._rules = list(rules)
        if add_identity:
            self._rules.append(IdentityRule())

    def map(self, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        """A new state dict with the keys renamed (values are shared, not copied)."""
        new_state: dict[str, Any] = {}
        for key, value in state_dict.items():
            rule = next((r for r in self._rules if r.matches(key)), None)
            if rule is None:
                logger.debug("no rule for %s: dropped", key)
                continue
            new_state.update(rule.apply(key, value))
        return new_state

    @classmethod
    def load_file(cls, filepath, model_root: str | None = None, map_location=None,
                  **other_args) -> dict[str, Any]:
        """``torch.load(filepath, map_location, **other_args)``, mapped by ``cls()``.

        ``model_root``: the key under which the file keeps the state dict to map
        (e.g. ``"model"`` in a training checkpoint); None: the file is the state dict.
        """
        state = torch.load(filepath, map_location=map_location, **other_args)
        if model_root is None:
            return cls().map(state)
        if model_root not in state:
            raise ValueError(f"model_root: {model_root!r} is not a key of {filepath} "
                             f"(keys: {sorted(state)})")
        state[model_root] = cls().map(state[model_root])
        return state


class PytorchMapper(SimpleMapper):
    """``torch.nn.TransformerEncoder`` (post-norm layers) -> our ``TransformerEncoder``.

    Attention projections are renamed (and the packed one split); ``linear1``,
    ``linear2``, ``norm1``, ``norm2`` and a final ``norm`` keep their names.
    """

    def __init__(self) -> None:
        super().__init__([
            PytorchAttentionWeightsRule(),
            RegexRule(r"\.self_attn\.out_proj\.", ".attention.out_projection."),
        ])


class HugginfaceBertEncoderMapper(SimpleMapper):
    """A Hugging Face ``BertEncoder``'s state dict (``model.encoder.state_dict()``) ->
    our ``TransformerEncoder`` built with activation="gelu" and no final norm.

    BERT's LayerNorm epsilon is 1e-12 and ours 1e-5: outputs differ by about 1e-5
    (a BertConfig with layer_norm_eps=1e-5 gives the same outputs within float32 rounding).
    """

    RULES = (
        RegexRule(r"^layer\.(\d+)\.attention\.self\.(query|key|value)\.",
                  r"layers.\1.attention.\2_projection."),
        RegexRule(r"^layer\.(\d+)\.attention\.output\.dense\.",
                  r"layers.\1.attention.out_projection."),
        RegexRule(r"^layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.norm1."),
        RegexRule(r"^layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.linear1."),
        RegexRule(r"^layer\.(\d+)\.output\.dense\.", r"layers.\1.linear2."),
        RegexRule(r"^layer\.(\d+)\.output\.LayerNorm\.", r"layers.\1.norm2."),
    )

    def __init__(self) -> None:
        super().__init__(self.RULES)


class LongformerMapper(SimpleMapper):
    """A Longformer encoder's state dict -> ours, as BERT's; the projections of its
    global attention (``query_global``, ...) have no counterpart and are dropped."""

    def __init__(self) -> None:
        super().__init__([
            *HugginfaceBertEncoderMapper.RULES,
            NotRule(RegexRule(r"\.attention\.self\.(query|key|value)_global\.", "")),
        ], add_identity=False)


__all__ = [
    "HugginfaceBertEncoderMapper",
    "IdentityRule",
    "LongformerMapper",
    "MappingRule",
    "NotRule",
    "OrRule",
    "PytorchAttentionWeightsRule",
    "PytorchMapper",
    "RegexRule",
    "SimpleMapper",
]
