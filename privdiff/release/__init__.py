"""The one release path every method and front uses (layer 2): plan -> reserve -> produce -> write -> commit.

``output_plan`` checks where a release will be written before any work; ``artifact`` reserves the release
in the ledger, runs the work, writes atomically and commits. Imports the privacy core and ``privdiff.io``;
knows no method (a method passes its own ``produce`` and ``write``).
"""
