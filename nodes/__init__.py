"""ComfyUI nodes of privdiff: thin wrappers that adapt ComfyUI objects and call the library.

Modules here import ComfyUI (``comfy``, ``comfy_api``, ``folder_paths``), except ``logic``, which
holds what the nodes do as plain functions.
"""
