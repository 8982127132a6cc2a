"""The live stream: training-thread publishers, latest-value slots, websocket fan-out."""

from .hub import Connection, Hub, Resolved, build_plan, resolve
from .publisher import Capture, Plan, Publisher, SampleNeed

__all__ = ["Capture", "Connection", "Hub", "Plan", "Publisher", "Resolved", "SampleNeed",
           "build_plan", "resolve"]
