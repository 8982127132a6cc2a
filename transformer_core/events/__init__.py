"""The event system: payload classes, the dispatcher and composable filters."""

from .dispatcher import EventDispatcher
from .event import AttentionEvent, Event, IntermediateOutput, QKVEvent
from .redirect import dispatching_to

__all__ = ["AttentionEvent", "Event", "EventDispatcher", "IntermediateOutput", "QKVEvent",
           "dispatching_to"]
