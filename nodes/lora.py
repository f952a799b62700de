"""DP LoRA: DP-SGD on LoRA adapters of ComfyUI's own MODEL, written to the loras folder for the core LoraLoader."""

from __future__ import annotations

from comfy_api.latest import io

from privdiff.app.lora import train_lora
from privdiff.app.release_options import Release
from privdiff.lora.training import LoRAConfig

from .comfy_backend import training_session
from .common import CATEGORY, Dataset, default_ledger, loras_dir, optional_release_inputs, progress_bar


class PrivdiffDPLoRA(io.ComfyNode):
    """Trains a differentially private LoRA on the connected checkpoint and writes it to models/loras."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PrivdiffDPLoRA",
            display_name="DP LoRA",
            category=CATEGORY,
            description="Learn a style from private images as a LoRA with a formal (epsilon, delta)-DP guarantee "
                        "(DP-SGD on low-rank adapters of the UNet's attention: per-image clipped gradients with "
                        "calibrated Gaussian noise). Load the file with the core Load LoRA node; it carries its "
                        "privacy report.",
            inputs=[
                io.Model.Input("model", tooltip="The checkpoint's model (SD1.x, SD2.x or SDXL); it is left as it was."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP, for the training prompt (frozen)."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE, to encode the private images (frozen)."),
                Dataset.Input("dataset", tooltip="From Load Private Images."),
                io.String.Input("name", default="my_dp_lora",
                                tooltip="File name in ComfyUI's loras folder (<name>.safetensors). Load LoRA keeps a "
                                        "file it has loaded: after overwriting one, pick another name or restart."),
                io.Float.Input("epsilon", default=4.0, min=0.01, max=1000.0, step=0.01, round=False,
                               tooltip="Privacy budget epsilon of this release (smaller = more private, noisier)."),
                io.Float.Input("delta", default=1e-5, min=1e-12, max=0.1, step=1e-6, round=False,
                               tooltip="Privacy delta; must be below 1/N for N private images."),
                io.Float.Input("sample_rate", default=1.0, min=0.001, max=1.0, step=0.001, round=False,
                               tooltip="Poisson sampling rate q of each step; 1 means batch_size/N."),
                io.Float.Input("clip_norm", default=1.0, min=1e-4, max=100.0, step=0.01, round=False,
                               tooltip="Bound C on each image's gradient."),
                io.Int.Input("rank", default=4, min=1, max=128, tooltip="Adapter rank."),
                io.Float.Input("alpha", default=4.0, min=0.01, max=1024.0, step=0.01, round=False,
                               tooltip="Adapter alpha: the update is scaled by alpha/rank."),
                io.Combo.Input("targets", options=["attn", "attn-ff"], default="attn",
                               tooltip="attn: the attention projections; attn-ff: also the feed-forward layers."),
                io.Int.Input("steps", default=200, min=1, max=100000, tooltip="DP-SGD steps."),
                io.Float.Input("learning_rate", default=1e-3, min=1e-6, max=1.0, step=0.0001, round=False,
                               tooltip="Adam learning rate."),
                io.Int.Input("batch_size", default=16, min=1, max=256,
                             tooltip="Expected images per step, and the most per gradient microbatch."),
                io.String.Input("prompt", default="",
                                tooltip="The public prompt every image is trained with (empty: none)."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing LoRA of the same name."),
                *optional_release_inputs(public_size=False),
            ],
            outputs=[
                io.String.Output("lora_name", display_name="lora name",
                                 tooltip="The file in the loras folder, as Load LoRA lists it."),
                io.String.Output("report", display_name="privacy report", tooltip="The release's privacy report."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, name: str, epsilon: float, delta: float, sample_rate: float,
                clip_norm: float, rank: int, alpha: float, targets: str, steps: int, learning_rate: float,
                batch_size: int, prompt: str, overwrite: bool, **optional) -> io.NodeOutput:
        config = LoRAConfig(rank=rank, alpha=alpha, targets=targets, steps=steps, lr=learning_rate,
                            batch_size=batch_size, prompt=prompt)
        release = Release(name=name.strip(), epsilon=epsilon, delta=delta, sample_rate=sample_rate,
                          clip_norm=clip_norm, bound="clip", prompt_template="{}", overwrite=overwrite, **optional)
        with training_session(model, clip, vae) as backend:
            lora, report = train_lora(backend, dataset, config, release, loras_dir(), progress_bar(),
                                      default_ledger())
        return io.NodeOutput(f"{lora}.safetensors", report)
