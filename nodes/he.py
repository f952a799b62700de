"""Encrypted denoising in ComfyUI (HE-Diffusion): a KSampler whose scheduler steps run under CKKS."""

from __future__ import annotations

import secrets
from collections.abc import Callable

import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import latent_preview
import torch
from comfy_api.latest import io

from privdiff.app.he import (
    NOISE_SOURCES,
    SAMPLERS,
    check_sampler,
    check_worker,
    encrypted_stepper,
    latent_noise,
    sample,
    sampler_report,
)
from privdiff.errors import PrivdiffError
from privdiff.he.noise import LatentNoise
from privdiff.he.sampler import HEConfig
from privdiff.he.selection import CHANNELS
from privdiff.he.stepper import PACKINGS, EncryptedStepper

from .common import CATEGORY


def schedule(model, scheduler: str, steps: int, denoise: float) -> torch.Tensor:
    """The sigmas KSampler uses for these settings (with denoise < 1, the last ``steps`` of a longer schedule)."""
    if denoise <= 0:
        return torch.zeros(0)
    total = steps if denoise > 0.9999 else int(steps / denoise)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, total).cpu()
    return sigmas[-(steps + 1):]


def sampler_function(sampler: str, stepper: EncryptedStepper, noise: LatentNoise) -> Callable:
    """A k-diffusion sampler function for comfy.samplers.KSAMPLER: ComfyUI's denoiser, privdiff's encrypted step,
    euler_ancestral's noise from ``noise``. Each step reports to ComfyUI's callback (progress bar and preview) and
    is a cancel point."""

    @torch.no_grad()
    def run(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None, callback=None,
            disable: bool | None = None) -> torch.Tensor:
        extra_args = {} if extra_args is None else extra_args
        s_in = x.new_ones([x.shape[0]])
        last: dict = {}

        def denoise(state: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            denoised = model(state, sigma * s_in, **extra_args)
            last.update(x=state, sigma=sigma, sigma_hat=sigma, denoised=denoised)
            return denoised

        def progress(done: int, total: int) -> None:
            if callback is not None:
                callback({"i": done - 1, **last})
            comfy.model_management.throw_exception_if_processing_interrupted()

        def ancestral(sigma: float, sigma_next: float) -> torch.Tensor:
            return noise(x.shape).to(x)

        return sample(denoise, x, sigmas, stepper, sampler, ancestral, progress)

    return run


class PrivdiffEncryptedSampler(io.ComfyNode):
    """KSampler with every scheduler step's state update encrypted (CKKS), key holder here."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PrivdiffEncryptedSampler",
            display_name="Encrypted Sampler (HE)",
            category=CATEGORY,
            description="Use in place of KSampler. Each step, ComfyUI's model predicts in plaintext here (the key "
                        "holder); the state update runs on CKKS ciphertexts of the selected latent elements (HILL "
                        "min-distortion selection, HE-Diffusion), by a worker that holds only the public context: in "
                        "this process, or a `privdiff he worker --listen HOST:PORT`. Outputs the latent and a report "
                        "of what was encrypted and what each party saw.",
            inputs=[
                io.Model.Input("model", tooltip="The model used for denoising (the key holder runs it)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the initial and euler_ancestral noise, used only with noise = seed."),
                io.Int.Input("steps", default=20, min=1, max=1000, tooltip="Denoising steps."),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale."),
                io.Combo.Input("sampler_name", options=list(SAMPLERS), default="euler",
                               tooltip="Samplers with an affine step. ddim is ComfyUI's: Euler steps (DDIM's own "
                                       "on the ddim_uniform scheduler)."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default="normal",
                               tooltip="The noise schedule, as KSampler's."),
                io.Conditioning.Input("positive", tooltip="Prompt conditioning."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning."),
                io.Latent.Input("latent_image", tooltip="The latent to denoise (Empty Latent Image, or an img2img "
                                                        "latent with denoise < 1)."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of the schedule to run, as KSampler's (below 1 for img2img)."),
                io.Float.Input("threshold", default=0.01, min=0.0, max=0.999, step=0.001, round=False,
                               tooltip="Share of the HILL distortion left in plaintext, in [0, 1): 0 encrypts every "
                                       "element that carries distortion. Ignored with dense packing."),
                io.Combo.Input("packing", options=list(PACKINGS), default="dense",
                               tooltip="dense (safest): the whole latent, so positions reveal nothing; sparse: the "
                                       "selected elements and their positions (HE-Diffusion; the worker rebuilds "
                                       "much of the image, see README)."),
                io.Combo.Input("channels", options=list(CHANNELS), default="reference",
                               tooltip="HILL filtering across the channels as HE-Diffusion (reference) or per "
                                       "channel."),
                io.Boolean.Input("encrypt_offsets", default=True,
                                 tooltip="Encrypt the updates' offsets too (safest), so the worker never sees the "
                                         "model's predictions for the encrypted elements."),
                io.String.Input("worker", default="",
                                tooltip="HOST:PORT of `privdiff he worker`; empty: both roles in this process."),
                io.Combo.Input("noise", options=list(NOISE_SOURCES), default="secret", optional=True,
                               tooltip="secret: initial and ancestral noise from a 256-bit key, not recorded; seed: "
                                       "reproducible from the seed, and a worker who knows it can rebuild the image "
                                       "(the seed is saved in workflows and PNGs)."),
            ],
            outputs=[
                io.Latent.Output(tooltip="The denoised latent; decode with VAE Decode."),
                io.String.Output("report", display_name="report",
                                 tooltip="What was encrypted, the HE cost, and what each party saw."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, noise: str = "secret", **_) -> str:
        """Secret noise is new on every run, so its result is never taken from ComfyUI's cache."""
        return secrets.token_hex(16) if noise == "secret" else ""

    @classmethod
    def execute(cls, model, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str, positive,
                negative, latent_image, denoise: float, threshold: float, packing: str, channels: str,
                encrypt_offsets: bool, worker: str, noise: str = "secret") -> io.NodeOutput:
        config = HEConfig(steps=steps, cfg=cfg, sampler="euler", threshold=threshold, packing=packing,
                          channels=channels, encrypt_offsets=encrypt_offsets)  # every sampler here steps as Euler
        check_sampler(sampler_name)
        worker = check_worker(worker)
        if sampler_name == "euler_ancestral" and isinstance(model.get_model_object("model_sampling"),
                                                            comfy.model_sampling.CONST):
            raise PrivdiffError("euler_ancestral is not available for flow-matching models here; use euler")
        source = latent_noise(noise, seed)
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        initial = source(latent.shape)
        sigmas = schedule(model, scheduler, steps, denoise)
        callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
        with encrypted_stepper(config, worker) as stepper:
            ksampler = comfy.samplers.KSAMPLER(sampler_function(sampler_name, stepper, source),
                                               inpaint_options={"random": True} if sampler_name == "ddim" else {})
            samples = comfy.sample.sample_custom(model, initial, cfg, ksampler, sigmas, positive, negative, latent,
                                                 noise_mask=latent_image.get("noise_mask"), callback=callback,
                                                 disable_pbar=True, seed=seed)
        out = {**latent_image, "samples": samples}
        return io.NodeOutput(out, sampler_report(config, stepper.stats, sampler_name, scheduler, denoise, source,
                                                 worker))
