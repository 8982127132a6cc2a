"""The live stream.

- :mod:`.plan` (core): :class:`~.plan.Plan` and :class:`~.plan.Capture`, what is captured;
- :mod:`.stats`, :mod:`.frames` (core): head statistics, captures encoded as frames;
- :mod:`.publisher` (training side): the in-process publisher, filling latest-value slots;
- :mod:`.hub` (web side): subscriptions, plans and per-socket senders.
- :mod:`.heads_feed` (web side): the ``heads`` messages (roles pushed once a second).

Nothing is imported here, so that the training side can use the core modules
without loading the web stack.
"""
