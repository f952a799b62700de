"""Deprecated: moved to ``privdiff.models.diffusers_backend``, kept for one release."""

from privdiff.models.diffusers_backend import DiffusersBackend

__all__ = ["DiffusersBackend"]
