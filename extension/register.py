"""A1111 entry point, run by the root shim ``scripts/privdiff_tab.py``: imports this folder as the package
``privdiff_extension`` (a unique name: other extensions may own a top-level ``extension``), puts the clone's
root on sys.path for the ``privdiff`` library, and registers the tab and the settings."""

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.append(str(HERE.parent))
if "privdiff_extension" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("privdiff_extension", HERE / "__init__.py",
                                                   submodule_search_locations=[str(HERE)])
    sys.modules["privdiff_extension"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["privdiff_extension"])

importlib.import_module("privdiff_extension.a1111").register()
