"""History: every run's attention on a fixed probe input, every K steps (thinned
logarithmically to about 200 snapshots), plus head statistics and scalars at
every step, stored under the data dir and served over REST.

- :mod:`.store`, :mod:`.config`, :mod:`.thinning` (core): the store and its settings;
- :mod:`.recorder` (training side): :class:`~.recorder.RunRecorder`, in the training thread;
- :mod:`.service` (training side): :class:`~.service.HistoryWriter`, the writer thread;
- :mod:`.router` (web side): ``/api/v1/runs/{id}/history`` and ``/api/v1/history``.

Wiring (in ``create_app``)::

    app.include_router(history.router.router)
    # in the lifespan:
    app.state.history = history.service.start(settings, registry)  # None: off or locked
    ...
    if app.state.history is not None: app.state.history.close()

Nothing is imported here, so that the training side loads no web framework.
"""
