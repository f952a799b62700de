"""privdiff: privacy-preserving adaptation and generation for Stable Diffusion."""

from importlib.metadata import PackageNotFoundError, version

from privdiff.errors import PrivdiffError

try:
    __version__ = version("privdiff")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

__all__ = ["PrivdiffError", "__version__"]
