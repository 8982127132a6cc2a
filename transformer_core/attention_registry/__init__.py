"""Where attention implementations register themselves for the builders.

``AttentionRegistry.register(name, cls, [(param_name, spec), ...])`` makes
``cls`` buildable as ``attention_type=name``; see :mod:`.registry` for an example.
"""

from .registry import (
    AttentionRegistry,
    RecurrentAttentionRegistry,
    RecurrentCrossAttentionRegistry,
    Registry,
)
from .spec import Bool, Callable, Choice, EventDispatcherInstance, Float, Int, Optional, Spec

__all__ = [
    "AttentionRegistry",
    "Bool",
    "Callable",
    "Choice",
    "EventDispatcherInstance",
    "Float",
    "Int",
    "Optional",
    "RecurrentAttentionRegistry",
    "RecurrentCrossAttentionRegistry",
    "Registry",
    "Spec",
]
