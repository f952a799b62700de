"""Spectral DP generation in ComfyUI: a DP-SGD fine-tune of a public spectral prior on private images, and
coarse samples from any prior (upsample them with core ComfyUI nodes: Upscale Image (using Model), or an SD
img2img pass)."""

from __future__ import annotations

import os
from pathlib import Path

import comfy.model_management
import folder_paths
import torch
from comfy_api.latest import io

from privdiff.app.release_options import Release, folder_state
from privdiff.app.spectral import finetune_spectral
from privdiff.errors import PrivdiffError
from privdiff.wavelet.training import TrainConfig
from privdiff.wavelet.workflow import sample_prior

from .common import (
    CATEGORY,
    PRIORS,
    checkpoints_dir,
    default_ledger,
    input_path,
    optional_release_inputs,
    priors_dir,
    progress_bar,
)

# public_size: DP-SGD treats N as public (add-remove).
_NOT_APPLICABLE = {"public_size"}


def prior_options() -> list[str]:
    """The prior files ComfyUI's privdiff_priors folders hold (public priors and DP fine-tunes)."""
    priors_dir()
    return folder_paths.get_filename_list(PRIORS)


def prior_path(name: str) -> Path:
    """The file of a prior input's value; a one-line error when it is gone."""
    priors_dir()
    path = folder_paths.get_full_path(PRIORS, name)
    if path is None:
        raise PrivdiffError(f"prior {name!r} is not in ComfyUI's models/{PRIORS} folder")
    return Path(path)


def prior_input(tooltip: str) -> io.Combo.Input:
    return io.Combo.Input("prior", options=prior_options(), tooltip=tooltip)


class PrivdiffSpectralFinetune(io.ComfyNode):
    """Releases a DP fine-tune of a public spectral prior on a folder of private images."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PrivdiffSpectralFinetune",
            display_name="DP Spectral Fine-tune",
            category=CATEGORY,
            description="Fine-tune a public spectral prior (an autoregressive model over coarse Haar-wavelet "
                        "tokens, pre-trained on public images with `privdiff wavelet pretrain`) on private images "
                        "with DP-SGD: per-image gradients clipped, Gaussian noise calibrated for (epsilon, delta). "
                        "Writes models/privdiff_priors/<name>.safetensors with its privacy report; sample it with "
                        "Spectral Sample. An interrupted run resumes when queued again (charged once).",
            inputs=[
                prior_input("The PUBLIC prior to start from (models/privdiff_priors); its pre-training images must "
                            "really be public."),
                io.String.Input("folder", default="private_images",
                                tooltip="Folder of private images: an absolute path, or relative to ComfyUI's input "
                                        "folder. One image is one example."),
                io.String.Input("name", default="my_dp_prior",
                                tooltip="File name of the DP prior in models/privdiff_priors (or an absolute path)."),
                io.Float.Input("epsilon", default=4.0, min=0.01, max=1000.0, step=0.01, round=False,
                               tooltip="Privacy budget epsilon of this release (smaller = more private, noisier)."),
                io.Float.Input("delta", default=1e-5, min=1e-12, max=0.1, step=1e-6, round=False,
                               tooltip="Privacy delta; must be below 1/N for N private images."),
                io.Float.Input("sample_rate", default=0.1, min=0.001, max=1.0, step=0.001, round=False,
                               tooltip="Poisson sampling rate q: each step uses each image with probability q "
                                       "(expected batch q*N)."),
                io.Float.Input("clip_norm", default=1.0, min=1e-4, max=100.0, step=0.01, round=False,
                               tooltip="Bound C on each image's gradient (per-sample clipping)."),
                io.Int.Input("steps", default=300, min=1, max=100000, tooltip="DP-SGD steps (each one is accounted)."),
                io.Float.Input("learning_rate", default=3e-4, min=1e-7, max=1.0, step=1e-5, round=False,
                               tooltip="Adam learning rate."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing prior of that name."),
                *[i for i in optional_release_inputs() if i.id not in _NOT_APPLICABLE],
            ],
            outputs=[
                io.String.Output("prior_name", display_name="DP prior",
                                 tooltip="The DP prior's file name in models/privdiff_priors (pick it in Spectral "
                                         "Sample's prior input)."),
                io.String.Output("report", display_name="privacy report", tooltip="The release's privacy report."),
            ],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, folder: str, **_) -> str:
        """Changes whenever a file of the folder is added, removed, renamed or modified: ComfyUI re-runs."""
        return folder_state(input_path(folder))

    @classmethod
    def execute(cls, prior: str, folder: str, name: str, epsilon: float, delta: float, sample_rate: float,
                clip_norm: float, steps: int, learning_rate: float, overwrite: bool, **optional) -> io.NodeOutput:
        release = Release(name=name.strip(), epsilon=epsilon, delta=delta, sample_rate=sample_rate,
                          clip_norm=clip_norm, bound="clip", prompt_template="{}", overwrite=overwrite, **optional)
        config = TrainConfig(steps=steps, lr=learning_rate)
        public = prior_path(prior)
        with torch.inference_mode(False), torch.enable_grad():  # ComfyUI runs nodes in inference mode
            report, path = finetune_spectral(public, input_path(folder), release, config, priors_dir(),
                                             checkpoints_dir(), progress_bar(), default_ledger(),
                                             device=comfy.model_management.get_torch_device())
        return io.NodeOutput(path.name, report)


class PrivdiffSpectralSample(io.ComfyNode):
    """Coarse images drawn from a spectral prior."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PrivdiffSpectralSample",
            display_name="Spectral Sample",
            category=CATEGORY,
            description="Draw coarse images (the prior's resolution, e.g. 32 px) from a spectral prior, token by "
                        "token, coarse to fine. Sampling a DP prior is post-processing: it spends no budget. "
                        "Upsample with Upscale Image (using Model) or an SD img2img pass.",
            inputs=[
                prior_input("A prior file in models/privdiff_priors (a DP fine-tune, or a public prior)."),
                io.Int.Input("num_images", default=4, min=1, max=1024, tooltip="Images in the batch."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Sampling seed: the same seed gives the same images."),
                io.Float.Input("temperature", default=1.0, min=0.01, max=100.0, step=0.01, round=False,
                               tooltip="Below 1: more typical images; above 1: more varied ones."),
            ],
            outputs=[io.Image.Output(tooltip="Coarse images at the prior's resolution.")],
        )

    @classmethod
    def fingerprint_inputs(cls, prior: str, **_) -> str:
        """Changes when the prior file is replaced (a DP prior re-released with overwrite)."""
        path = folder_paths.get_full_path(PRIORS, prior)
        try:
            stat = os.stat(path) if path else None
        except OSError:
            stat = None
        return f"{path}\0{stat and stat.st_size}\0{stat and stat.st_mtime_ns}"

    @classmethod
    def execute(cls, prior: str, num_images: int, seed: int, temperature: float) -> io.NodeOutput:
        images, _ = sample_prior(prior_path(prior), num_images, seed=seed, temperature=temperature,
                                 progress=progress_bar(), device=comfy.model_management.get_torch_device())
        out = images.movedim(1, -1).contiguous()  # [B,3,H,W] -> ComfyUI's [B,H,W,C]
        return io.NodeOutput(out.to(comfy.model_management.intermediate_device()))
