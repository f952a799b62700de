"""DP Aggregate Embeddings: the DPAgg mechanism over per-image embedding files trained elsewhere."""

from __future__ import annotations

from comfy_api.latest import io

from privdiff.app.embeddings import aggregate_files
from privdiff.app.release_options import Release

from .common import (
    CATEGORY,
    default_ledger,
    embeddings_dir,
    input_path,
    name_input,
    optional_release_inputs,
    output_inputs,
    privacy_inputs,
    release_outputs,
)


class PrivdiffDPAggregateEmbeddings(io.ComfyNode):
    """Clips and averages per-image embeddings with calibrated Gaussian noise into one DP embedding."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PrivdiffDPAggregateEmbeddings",
            display_name="DP Aggregate Embeddings",
            category=CATEGORY,
            description="Release one (epsilon, delta)-DP embedding from a folder of per-image embeddings "
                        "(each trained on exactly one private image): offsets clipped to C, summed, Gaussian "
                        "noise added, divided by the expected count.",
            inputs=[
                io.String.Input("folder", default="per_image_embeddings",
                                tooltip="Folder of per-image embedding files: absolute, or relative to ComfyUI's "
                                        "input folder."),
                io.Boolean.Input("one_image_per_file", default=False,
                                 tooltip="Confirm that every file was trained on exactly one image. The guarantee "
                                         "depends on it."),
                name_input(),
                *privacy_inputs(noise_multiplier=True),
                *output_inputs(),
                io.String.Input("center", default="", optional=True,
                                tooltip="Public embedding file the offsets are measured from (empty: zero)."),
                io.String.Input("images_folder", default="", optional=True,
                                tooltip="Folder of the images the files were trained on, one per file: the ledger "
                                        "charges these images (required, since a ledger is always kept)."),
                *optional_release_inputs(),
            ],
            outputs=release_outputs(),
            is_output_node=True,
        )

    @classmethod
    def execute(cls, folder: str, one_image_per_file: bool, name: str, epsilon: float, delta: float,
                noise_multiplier: float, sample_rate: float, clip_norm: float, bound: str, prompt_template: str,
                overwrite: bool, center: str = "", images_folder: str = "", **optional) -> io.NodeOutput:
        release = Release(name=name.strip(), epsilon=epsilon, delta=delta, sample_rate=sample_rate,
                          clip_norm=clip_norm, bound=bound, prompt_template=prompt_template, overwrite=overwrite,
                          noise_multiplier=noise_multiplier, **optional)
        center_path = str(input_path(center)) if center.strip() else ""
        images_path = str(input_path(images_folder)) if images_folder.strip() else ""
        return io.NodeOutput(*aggregate_files(str(input_path(folder)), one_image_per_file, center_path, release,
                                              embeddings_dir(), images_path, default_ledger()))
