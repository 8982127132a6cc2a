"""Scripted captures: ``POST /api/v1/captures`` runs one forward pass of a run's
model between training steps and stores the tensors it asked for (an SQLite
index plus one safetensors file each); ``GET`` downloads them as npz,
safetensors or json.

- :mod:`.capture` (core): :func:`~.capture.run_capture`, one forward pass with a
  private listener;
- :mod:`.store`, :mod:`.formats` (core): the store and the download formats;
- :mod:`.requests`, :mod:`.router`, :mod:`.models`: the REST API.

Wiring (in ``create_app``)::

    app.include_router(router.build_router(service.CaptureLimits.from_settings(settings)))
    # in the lifespan:
    app.state.capture_store = store.open_store(settings)   # ... store.close() at shutdown

Nothing is imported here, so that the training side loads no web framework.
"""
