"""Deprecated: moved to ``privdiff.models.registry``, kept for one release."""

from privdiff.models.registry import load_model

__all__ = ["load_model"]
