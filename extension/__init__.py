"""The AUTOMATIC1111 / Forge extension of privdiff: a privdiff tab with one sub-tab per capability.

A1111 runs the root shims ``install.py`` (→ ``extension/install.py``) and ``scripts/privdiff_tab.py``
(→ ``extension/register.py``). ``logic`` holds what the tab does as plain functions, ``a1111_backend`` the
SDBackend over A1111's model, ``host`` the bridge to A1111's ``modules``, ``ui`` and ``tabs/`` the gradio
layout. Only ``host``, ``a1111``, ``ui_parts`` and ``tabs/`` import A1111 or gradio, and only inside A1111.
"""
