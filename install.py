"""AUTOMATIC1111 runs install.py at start-up; privdiff's installer lives in extension/install.py."""
import runpy, pathlib; runpy.run_path(str(pathlib.Path(__file__).resolve().parent / "extension" / "install.py"), run_name="__main__")  # noqa: E401, E501, E702, I001
