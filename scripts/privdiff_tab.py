"""AUTOMATIC1111 runs scripts/*.py at start-up; privdiff's extension lives in extension/ (see register.py)."""
import runpy, pathlib; runpy.run_path(str(pathlib.Path(__file__).resolve().parents[1] / "extension" / "register.py"))  # noqa: E401, E702, I001
