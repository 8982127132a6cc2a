"""Alerts: rules over the history's per-step head statistics (docs/statistics.md)."""
