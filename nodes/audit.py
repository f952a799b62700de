"""DP Audit nodes: one per release node. Each runs that release's mechanism once with canaries and shows an
empirical lower bound on its epsilon (privdiff.app.audit); none writes a file or charges a ledger."""

from __future__ import annotations

import comfy.model_management
import torch
from comfy_api.latest import io, ui

from privdiff.app.audit import audit_aggregate_files, audit_embedding, audit_spectral, audit_style_target
from privdiff.app.release_options import Release, folder_state
from privdiff.embeddings.textual_inversion import TIConfig
from privdiff.wavelet.training import TrainConfig

from .comfy_backend import training_session
from .common import CATEGORY, Dataset, input_path, optional_release_inputs, privacy_inputs, progress_bar, ti_inputs
from .guidance import ComfyClipVision
from .wavelet import prior_input, prior_path

NOT_A_RELEASE = " Not a release: it writes no file and charges no ledger."


def audit_inputs() -> list:
    """canaries and confidence."""
    return [
        io.Int.Input("canaries", default=64, min=2, max=100_000,
                     tooltip="Canaries M: each goes into the audited run with probability 1/2. More canaries give a "
                             "tighter bound and a longer run."),
        io.Float.Input("confidence", default=0.95, min=0.5, max=0.999, step=0.001, round=False,
                       tooltip="Confidence of the lower bound."),
    ]


def optional_audit_inputs(public_size: bool = True) -> list:
    """The optional release inputs an audit uses (public size, label, seed); not the ledger's nor new_release."""
    wanted = {"dataset_label", "reproducible_seed"} | ({"public_size"} if public_size else set())
    return [i for i in optional_release_inputs() if i.id in wanted]


def audit_output() -> list:
    return [io.String.Output("audit", display_name="audit",
                             tooltip="The lower bound against the claimed epsilon, then the JSON; link it to "
                                     "Preview Any to read it.")]


def answer(text: str) -> io.NodeOutput:
    return io.NodeOutput(text, ui=ui.PreviewText(text))


def audit_release(**options) -> Release:
    """Release options for an audit: no name, output or ledger (an audit writes and charges nothing)."""
    return Release(name="audit", prompt_template="{}", **options)


class PrivdiffAuditTextualInversion(io.ComfyNode):
    """Audits DP Textual Inversion (DPAgg-TI or DP-SGD) with canary images."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PrivdiffAuditTextualInversion",
            display_name="DP Audit: Textual Inversion",
            category=CATEGORY,
            description="Check DP Textual Inversion's guarantee empirically: one run of the same mechanism on the "
                        "private images plus random mosaic canaries (each in with probability 1/2), then an "
                        "attack that tells which canaries were in; the number it gets right bounds epsilon from "
                        "below (Steinke, Nasr & Jagielski 2023)." + NOT_A_RELEASE,
            inputs=[
                io.Model.Input("model", tooltip="The checkpoint's model (SD1.x, SD2.x or SDXL)."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE, to encode the images and canaries."),
                Dataset.Input("dataset", tooltip="From Load Private Images."),
                io.Combo.Input("method", options=["dpagg", "dpsgd"], default="dpagg",
                               tooltip="The release audited: dpagg (DPAgg-TI) or dpsgd (the DP-SGD baseline; "
                                       "sample rate 1 means batch/N)."),
                *privacy_inputs(),
                *ti_inputs(),
                *audit_inputs(),
                *optional_audit_inputs(),
            ],
            outputs=audit_output(),
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, method: str, epsilon: float, delta: float, sample_rate: float,
                clip_norm: float, bound: str, vectors: int, init_word: str, templates: str, steps: int,
                learning_rate: float, batch_size: int, canaries: int, confidence: float,
                **optional) -> io.NodeOutput:
        config = TIConfig(n_vectors=vectors, init_word=init_word, steps=steps, lr=learning_rate,
                          batch_size=batch_size, templates=templates)
        release = audit_release(epsilon=epsilon, delta=delta, sample_rate=sample_rate, clip_norm=clip_norm,
                                bound=bound, **optional)
        with training_session(model, clip, vae) as backend:
            text = audit_embedding(backend, dataset, method, config, release, canaries, confidence, progress_bar())
        return answer(text)


class PrivdiffAuditAggregateEmbeddings(io.ComfyNode):
    """Audits DP Aggregate Embeddings with canary per-image embeddings."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PrivdiffAuditAggregateEmbeddings",
            display_name="DP Audit: Aggregate Embeddings",
            category=CATEGORY,
            description="Check DP Aggregate Embeddings' guarantee empirically: one aggregate of the per-image "
                        "embeddings plus canary embeddings (random offsets of norm C, each in with probability "
                        "1/2), scored by projecting the result on each canary's offset." + NOT_A_RELEASE,
            inputs=[
                io.String.Input("folder", default="per_image_embeddings",
                                tooltip="Folder of per-image embedding files: absolute, or relative to ComfyUI's "
                                        "input folder."),
                io.Boolean.Input("one_image_per_file", default=False,
                                 tooltip="Confirm that every file was trained on exactly one image."),
                *privacy_inputs(noise_multiplier=True),
                *audit_inputs(),
                io.String.Input("center", default="", optional=True,
                                tooltip="Public embedding file the offsets are measured from (empty: zero)."),
                *optional_audit_inputs(),
            ],
            outputs=audit_output(),
            is_output_node=True,
        )

    @classmethod
    def execute(cls, folder: str, one_image_per_file: bool, epsilon: float, delta: float, noise_multiplier: float,
                sample_rate: float, clip_norm: float, bound: str, canaries: int, confidence: float, center: str = "",
                **optional) -> io.NodeOutput:
        release = audit_release(epsilon=epsilon, delta=delta, sample_rate=sample_rate, clip_norm=clip_norm,
                                bound=bound, noise_multiplier=noise_multiplier, **optional)
        center_path = str(input_path(center)) if center.strip() else ""
        return answer(audit_aggregate_files(str(input_path(folder)), one_image_per_file, center_path, release,
                                            canaries, confidence))


class PrivdiffAuditStyleTarget(io.ComfyNode):
    """Audits DP Style Target with canary images."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PrivdiffAuditStyleTarget",
            display_name="DP Audit: Style Target",
            category=CATEGORY,
            description="Check DP Style Target's guarantee empirically: one target from the private images plus "
                        "random mosaic canaries (each in with probability 1/2), scored by projecting the target on "
                        "each canary's image embedding." + NOT_A_RELEASE,
            inputs=[
                Dataset.Input("dataset", tooltip="From Load Private Images."),
                io.ClipVision.Input("clip_vision", tooltip="The image encoder (Load CLIP Vision)."),
                io.Float.Input("epsilon", default=4.0, min=0.01, max=1000.0, step=0.01, round=False,
                               tooltip="Privacy budget epsilon of the release audited."),
                io.Float.Input("delta", default=1e-5, min=1e-12, max=0.1, step=1e-6, round=False,
                               tooltip="Privacy delta; must be below 1/(N + canaries)."),
                io.Float.Input("sample_rate", default=1.0, min=0.001, max=1.0, step=0.001, round=False,
                               tooltip="Poisson sampling rate q."),
                *audit_inputs(),
                *optional_audit_inputs(),
            ],
            outputs=audit_output(),
            is_output_node=True,
        )

    @classmethod
    def execute(cls, dataset, clip_vision, epsilon: float, delta: float, sample_rate: float, canaries: int,
                confidence: float, **optional) -> io.NodeOutput:
        release = audit_release(epsilon=epsilon, delta=delta, sample_rate=sample_rate, clip_norm=1.0,
                                bound="normalize", **optional)
        with torch.inference_mode(False):
            comfy.model_management.load_models_gpu([clip_vision.patcher], force_full_load=True)
            text = audit_style_target(ComfyClipVision(clip_vision), dataset, release, canaries, confidence,
                                      progress_bar())
        return answer(text)


class PrivdiffAuditSpectralFinetune(io.ComfyNode):
    """Audits DP Spectral Fine-tune with canary images."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PrivdiffAuditSpectralFinetune",
            display_name="DP Audit: Spectral Fine-tune",
            category=CATEGORY,
            description="Check DP Spectral Fine-tune's guarantee empirically: one DP-SGD fine-tune on the private "
                        "images plus random mosaic canaries (each in with probability 1/2), scored by how much each "
                        "canary's loss dropped. A lower bound: loose for DP-SGD with few canaries." + NOT_A_RELEASE,
            inputs=[
                prior_input("The PUBLIC prior the fine-tune starts from (models/privdiff_priors)."),
                io.String.Input("folder", default="private_images",
                                tooltip="Folder of private images: an absolute path, or relative to ComfyUI's input "
                                        "folder."),
                io.Float.Input("epsilon", default=4.0, min=0.01, max=1000.0, step=0.01, round=False,
                               tooltip="Privacy budget epsilon of the release audited."),
                io.Float.Input("delta", default=1e-5, min=1e-12, max=0.1, step=1e-6, round=False,
                               tooltip="Privacy delta; must be below 1/(N + canaries)."),
                io.Float.Input("sample_rate", default=0.1, min=0.001, max=1.0, step=0.001, round=False,
                               tooltip="Poisson sampling rate q of each DP-SGD step."),
                io.Float.Input("clip_norm", default=1.0, min=1e-4, max=100.0, step=0.01, round=False,
                               tooltip="Bound C on each image's gradient (per-sample clipping)."),
                io.Int.Input("steps", default=300, min=1, max=100000, tooltip="DP-SGD steps (each one is accounted)."),
                io.Float.Input("learning_rate", default=3e-4, min=1e-7, max=1.0, step=1e-5, round=False,
                               tooltip="Adam learning rate."),
                *audit_inputs(),
                *optional_audit_inputs(public_size=False),
            ],
            outputs=audit_output(),
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, folder: str, **_) -> str:
        """Changes whenever a file of the folder is added, removed, renamed or modified: ComfyUI re-runs."""
        return folder_state(input_path(folder))

    @classmethod
    def execute(cls, prior: str, folder: str, epsilon: float, delta: float, sample_rate: float, clip_norm: float,
                steps: int, learning_rate: float, canaries: int, confidence: float, **optional) -> io.NodeOutput:
        release = audit_release(epsilon=epsilon, delta=delta, sample_rate=sample_rate, clip_norm=clip_norm,
                                bound="clip", **optional)
        with torch.inference_mode(False), torch.enable_grad():  # ComfyUI runs nodes in inference mode
            text = audit_spectral(prior_path(prior), input_path(folder), release,
                                  TrainConfig(steps=steps, lr=learning_rate), canaries, confidence, progress_bar(),
                                  device=comfy.model_management.get_torch_device())
        return answer(text)
