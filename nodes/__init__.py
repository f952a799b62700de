"""ComfyUI nodes of privdiff: thin wrappers that adapt ComfyUI objects and call the library.

Modules here import ComfyUI (``comfy``, ``comfy_api``, ``folder_paths``); what the nodes do, as plain
functions, is in ``privdiff.app`` (shared with the A1111 extension).
"""
