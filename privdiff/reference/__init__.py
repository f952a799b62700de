"""Tooling of the small reference model (top layer): its procedural data, training, style score and evaluation.

The model itself (architecture, shipped weights, attribute network) is ``privdiff.models.small`` and
``privdiff.models.small_classifier``; nothing in the library imports this package.
"""
