"""DP Textual Inversion: DPAgg-TI (or the DP-SGD baseline) on ComfyUI's own MODEL, CLIP and VAE."""

from __future__ import annotations

from comfy_api.latest import io

from privdiff.app.embeddings import train_embedding
from privdiff.app.release_options import Release
from privdiff.embeddings.textual_inversion import TIConfig

from .comfy_backend import training_session
from .common import (
    CATEGORY,
    Dataset,
    default_ledger,
    embeddings_dir,
    name_input,
    optional_release_inputs,
    output_inputs,
    privacy_inputs,
    progress_bar,
    release_outputs,
    ti_inputs,
)


class PrivdiffDPTextualInversion(io.ComfyNode):
    """Trains a differentially private textual-inversion embedding and writes it to the embeddings folder."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PrivdiffDPTextualInversion",
            display_name="DP Textual Inversion",
            category=CATEGORY,
            description="Learn a style or concept from private images as an embedding with a formal "
                        "(epsilon, delta)-DP guarantee (DPAgg-TI: per-image embeddings, clipped and averaged "
                        "with calibrated Gaussian noise). The file carries its privacy report.",
            inputs=[
                io.Model.Input("model", tooltip="The checkpoint's model (SD1.x, SD2.x or SDXL)."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP; the embedding is trained for it."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE, to encode the private images."),
                Dataset.Input("dataset", tooltip="From Load Private Images."),
                name_input(),
                io.Combo.Input("method", options=["dpagg", "dpsgd"], default="dpagg",
                               tooltip="dpagg: noisy aggregate of per-image embeddings. dpsgd: the DP-SGD baseline "
                                       "(one embedding, clipped noisy gradients; sample rate 1 means batch/N)."),
                *privacy_inputs(),
                *ti_inputs(),
                *output_inputs(),
                *optional_release_inputs(),
            ],
            outputs=release_outputs(),
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, name: str, method: str, epsilon: float, delta: float,
                sample_rate: float, clip_norm: float, bound: str, vectors: int, init_word: str, templates: str,
                steps: int, learning_rate: float, batch_size: int, prompt_template: str, overwrite: bool,
                **optional) -> io.NodeOutput:
        config = TIConfig(n_vectors=vectors, init_word=init_word, steps=steps, lr=learning_rate,
                          batch_size=batch_size, templates=templates)
        release = Release(name=name.strip(), epsilon=epsilon, delta=delta, sample_rate=sample_rate,
                          clip_norm=clip_norm, bound=bound, prompt_template=prompt_template, overwrite=overwrite,
                          **optional)
        with training_session(model, clip, vae) as backend:
            prompt, report, embedding = train_embedding(
                backend, dataset, method, config, release, embeddings_dir(), progress_bar(), default_ledger()
            )
        return io.NodeOutput(prompt, report, embedding)

