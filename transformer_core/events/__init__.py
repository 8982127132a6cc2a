"""The event system: payload classes, the dispatcher and composable filters."""

from .dispatcher import EventDispatcher
from .event import AttentionEvent, Event, IntermediateOutput, QKVEvent
from .redirect import dispatching_to
from .scores import SoftmaxScores
from .statistics import RowStatistics, row_statistics, spread_rows

__all__ = ["AttentionEvent", "Event", "EventDispatcher", "IntermediateOutput", "QKVEvent",
           "RowStatistics", "SoftmaxScores", "dispatching_to", "row_statistics", "spread_rows"]
