"""Load Private Images: a folder of private images as a dataset for the DP nodes."""

from __future__ import annotations

from comfy_api.latest import io

from privdiff.app.release_options import folder_state
from privdiff.io.images import load_private_dataset

from .common import CATEGORY, Dataset, input_path


class PrivdiffLoadPrivateImages(io.ComfyNode):
    """Reads every image of a folder (RGBA, grayscale and palette images are converted to RGB)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PrivdiffLoadPrivateImages",
            display_name="Load Private Images",
            category=CATEGORY,
            description="Load a folder of private images, centre-cropped and resized, for the DP training nodes. "
                        "The images never leave this graph except through a DP release.",
            inputs=[
                io.String.Input("folder", default="private_images",
                                tooltip="Folder of images: an absolute path, or relative to ComfyUI's input folder."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=8,
                             tooltip="Training resolution: 512 for SD1.x, 1024 for SDXL."),
            ],
            outputs=[Dataset.Output("dataset", display_name="private dataset",
                                    tooltip="The images and their files, for the DP nodes only.")],
        )

    @classmethod
    def fingerprint_inputs(cls, folder: str, resolution: int) -> str:
        """Changes whenever an image of the folder is added, removed, renamed or modified (by content digest, so an
        edit keeping size and mtime counts): ComfyUI reloads."""
        return folder_state(input_path(folder))

    @classmethod
    def execute(cls, folder: str, resolution: int) -> io.NodeOutput:
        return io.NodeOutput(load_private_dataset(input_path(folder), resolution))
