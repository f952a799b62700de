"""What the privdiff tab does, as plain functions over a ``Host``: inputs → library calls → outputs.

One module per sub-tab (as ``extension/tabs/``): ``textual_inversion``, ``guidance``, ``spectral``, ``he``,
``reports``, ``tools``; below them ``common`` (the Host, progress, one-line errors), ``forms`` (typed form fields)
and ``paths`` (names confined to the tab's folders).
"""
