"""What the GUI fronts (ComfyUI nodes, the A1111 tab) share (layer 5): release requests, naming, reports.

A front only translates its host's types and progress hooks, then calls a function here with plain
arguments. May import every layer below; never a front (nodes, extension) nor a host (comfy, modules, gradio).
"""
