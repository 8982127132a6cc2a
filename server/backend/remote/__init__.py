"""Remote publishing: a training process publishes its model to a running ``attnscope serve``.

- :mod:`.publisher` (training side): :class:`RemotePublisher`, behind
  ``Dashboard.connect(model, url, run=...)``.
- :mod:`.run` (server side): :class:`RemoteRun`, a run fed over the network.
- :mod:`.endpoint` (server side): the ``/ws/publish`` websocket publishers connect to.
- :mod:`.wire`: the messages between the two (docs/teams.md).
"""
