"""Deprecated: moved to ``privdiff.models``, kept for one release (only the import paths the README named)."""
