"""privdiff: privacy-preserving adaptation and generation for Stable Diffusion."""

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from privdiff.errors import PrivdiffError


def _version() -> str:
    """The installed version; in a plain source checkout (e.g. a ComfyUI git clone), pyproject's version."""
    try:
        return version("privdiff")
    except PackageNotFoundError:
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        try:  # no tomllib: it is new in Python 3.11, and this is the one line needed
            found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(encoding="utf-8"), re.MULTILINE)
        except OSError:
            found = None
        return found.group(1) if found else "0.0.0+unknown"


__version__ = _version()

__all__ = ["PrivdiffError", "__version__"]
