"""A1111 entry point, run by the root shim ``scripts/privdiff_tab.py``: imports this folder as the package
``privdiff_extension`` (a unique name: other extensions may own a top-level ``extension``) and the ``privdiff``
library from the clone's root, and registers the tab, the settings and the API routes.

A1111 restores ``sys.path`` after loading each script, so both packages are imported now: their later
submodule imports go through ``sys.modules``, not the path."""

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.append(str(HERE.parent))
import privdiff  # noqa: E402, F401

if "privdiff_extension" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("privdiff_extension", HERE / "__init__.py",
                                                   submodule_search_locations=[str(HERE)])
    sys.modules["privdiff_extension"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["privdiff_extension"])

importlib.import_module("privdiff_extension.callbacks").register()
