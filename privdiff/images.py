"""Deprecated: moved to ``privdiff.io.images``, kept for one release."""

from privdiff.io.images import load_image_folder

__all__ = ["load_image_folder"]
