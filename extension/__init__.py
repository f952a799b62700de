"""The AUTOMATIC1111 / Forge extension of privdiff: a privdiff tab with one sub-tab per capability.

A1111 runs the root shims ``install.py`` (→ ``install.py`` here: the installer) and ``scripts/privdiff_tab.py``
(→ ``register.py``: loads this folder, then ``callbacks.py`` hands A1111 the settings, the tab and the routes).
Top to bottom:

- ``callbacks.py``: A1111's script callbacks; ``settings.py``: privdiff's options on the Settings page.
- ``ui.py`` and ``tabs/``: the gradio tab, one module per sub-tab (``tabs/widgets.py``: what they share).
- ``api.py``: the same actions as JSON routes next to ``/sdapi``.
- ``host.py``: the ``Host`` over A1111's ``modules`` (folders, embeddings database, settings, progress).
- ``logic/``: what each sub-tab does, as plain functions over a ``Host``, one module per sub-tab (tested in CI).
- ``a1111_backend.py``: the SDBackend over A1111's loaded model (``shared.sd_model``).

Imports run down this list. Only ``callbacks``, ``settings``, ``host``, ``ui``, ``api`` and ``tabs/`` import A1111,
gradio or FastAPI, and only inside A1111 (inside functions, so CI imports every module without them).
"""
