"""Sub-tabs of the privdiff tab: ``TITLE`` and ``build(host, job)`` each (see ``extension/ui.py``)."""
