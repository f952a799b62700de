"""Privacy Report: show the report an embedding file carries."""

from __future__ import annotations

from pathlib import Path

import folder_paths
from comfy_api.latest import io, ui

from privdiff.app.reports import read_report

from .common import CATEGORY


class PrivdiffPrivacyReport(io.ComfyNode):
    """Reads the privacy report from an embedding's metadata."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PrivdiffPrivacyReport",
            display_name="Privacy Report",
            category=CATEGORY,
            description="Show the privacy report (epsilon, delta, mechanism, noise, accountant) of an embedding "
                        "file. Link the output to a Preview Any node to read it in the graph.",
            inputs=[io.Combo.Input("embedding", options=folder_paths.get_filename_list("embeddings"),
                                   tooltip="An embedding file from ComfyUI's embeddings folders.")],
            outputs=[io.String.Output("report", display_name="privacy report",
                                      tooltip="The report as text and JSON; link it to Preview Any to read it.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, embedding: str) -> io.NodeOutput:
        path = folder_paths.get_full_path("embeddings", embedding)
        if path is None:
            raise FileNotFoundError(f"embedding {embedding!r} is not in ComfyUI's embeddings folders")
        text = read_report(Path(path))
        return io.NodeOutput(text, ui=ui.PreviewText(text))
