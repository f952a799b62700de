"""privdiff: privacy-preserving adaptation and generation for Stable Diffusion."""

import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from privdiff.errors import PrivdiffError


def _version() -> str:
    """The installed version; in a plain source checkout (e.g. a ComfyUI git clone), pyproject's version."""
    try:
        return version("privdiff")
    except PackageNotFoundError:
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        try:
            return tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "0.0.0+unknown"


__version__ = _version()

__all__ = ["PrivdiffError", "__version__"]
