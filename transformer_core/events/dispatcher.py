"""The EventDispatcher: who listens to what, and delivering events to them."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, ClassVar

from .filters import EventFilter, to_event_filter

Handler = Callable[[Any], Any]


class _Redirects(threading.local):
    """Per thread: dispatcher -> the dispatcher its events go to instead (set by
    :func:`~transformer_core.events.redirect.dispatching_to`); None: no redirect."""

    table: dict[EventDispatcher, EventDispatcher] | None = None


_redirect = _Redirects()


class EventDispatcher:
    """Calls every registered handler whose filter accepts a dispatched event.

    Modules hold a dispatcher and check :attr:`has_listeners` before building an
    event, so a dispatcher nobody listens to costs one attribute read per layer.

    Listeners may be added or removed from another thread (the dashboard does
    this) while a training thread dispatches: the listener table is replaced,
    never mutated, so a dispatch in progress sees a consistent snapshot.

    >>> ed = EventDispatcher()
    >>> seen = []
    >>> ed.listen(lambda ev: ev == "hi", seen.append)
    >>> ed.dispatch("hi"); ed.dispatch("bye")
    >>> seen
    ['hi']
    """

    _dispatchers: ClassVar[dict[str, EventDispatcher]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self) -> None:
        self._listeners: dict[Handler, EventFilter] = {}
        self._lock = threading.Lock()
        self._key: str | None = None

    @property
    def has_listeners(self) -> bool:
        """True when at least one handler is registered (the hot-path check)."""
        table = _redirect.table  # one thread-local read on the hot path
        return bool((self if table is None else table.get(self, self))._listeners)

    def listen(self, event_filter: Any, event_handler: Handler) -> None:
        """Call ``event_handler(event)`` for every event ``event_filter`` accepts.

        ``event_filter`` may be an :class:`EventFilter`, an ``Event`` subclass
        or any callable taking an event and returning a bool.
        """
        flt = to_event_filter(event_filter)
        if flt is NotImplemented:
            raise TypeError(
                f"event_filter must be an EventFilter, an Event subclass or a callable, "
                f"got {type(event_filter).__name__}"
            )
        if not callable(event_handler):
            raise TypeError(f"event_handler must be callable, got {type(event_handler).__name__}")
        with self._lock:
            self._listeners = {**self._listeners, event_handler: flt}

    def remove(self, event_handler: Handler) -> None:
        """Unregister ``event_handler``; unknown handlers are ignored."""
        with self._lock:
            listeners = dict(self._listeners)
            listeners.pop(event_handler, None)
            self._listeners = listeners

    def clear(self) -> None:
        """Unregister every handler."""
        with self._lock:
            self._listeners = {}

    def dispatch(self, event: Any) -> None:
        """Deliver ``event`` to each handler whose filter accepts it, in registration order."""
        table = _redirect.table
        target = self if table is None else table.get(self, self)
        for handler, flt in tuple(target._listeners.items()):
            if flt(event):
                handler(event)

    @classmethod
    def get(cls, key: str | EventDispatcher = "") -> EventDispatcher:
        """The process-wide dispatcher for ``key``; an instance is returned as is.

        >>> EventDispatcher.get() is EventDispatcher.get("")
        True
        >>> ed = EventDispatcher(); EventDispatcher.get(ed) is ed
        True
        """
        if isinstance(key, EventDispatcher):
            return key
        if not isinstance(key, str):
            raise TypeError(
                "event_dispatcher must be a str key or an EventDispatcher, "
                f"got {type(key).__name__}"
            )
        with cls._registry_lock:
            if key not in cls._dispatchers:
                dispatcher = cls()
                dispatcher._key = key
                cls._dispatchers[key] = dispatcher
            return cls._dispatchers[key]

    def __reduce__(self):
        # A keyed dispatcher pickles (and deep-copies) as its key, so a copied or
        # unpickled model still talks to the process-wide dispatcher; a private
        # one becomes a fresh private dispatcher (handlers are not picklable).
        if self._key is not None:
            return (EventDispatcher.get, (self._key,))
        return (EventDispatcher, ())

    def __repr__(self) -> str:
        key = "private" if self._key is None else repr(self._key)
        return f"EventDispatcher({key}, listeners={len(self._listeners)})"
