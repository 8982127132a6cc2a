"""Transformers as recurrences: autoregressive inference one position per call.

Each module takes one position (N, d_model) and a state, and returns the
output and the new state; fed a sequence position by position, it gives the
outputs a batch model with the same weights gives under a causal mask.
Recurrent attentions dispatch one :class:`~transformer_core.events.AttentionEvent`
per step whose matrix is that step's row (N, H, 1, S).
"""
