"""The page (``index.html``, its ES modules and styles), installed as ``attnscope.frontend``.

Not Python: the files beside this one are package data, found with
``importlib.resources.files("attnscope.frontend")`` (see ``attnscope.backend.app``), so the
wheel serves the page without a source checkout. This file only makes the folder a
package that setuptools' editable installs can map.
"""
