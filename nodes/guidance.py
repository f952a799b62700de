"""DP Universal Guidance in ComfyUI: a DP style target from private images, and a sampler guided toward it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import comfy.model_management
import comfy.sample
import comfy.samplers
import torch
import torch.nn.functional as F
from comfy_api.latest import io

from privdiff.app.guidance import make_style_target
from privdiff.app.release_options import Release, target_path
from privdiff.guidance.sampler import GuidanceConfig, check_sample_memory, sample
from privdiff.guidance.target import StyleTarget, check_encoder, load_target
from privdiff.models.image_encoders import clip_preprocess, weight_identity

from .comfy_backend import ComfyBackend, gradient_session
from .common import CATEGORY, Dataset, default_ledger, optional_release_inputs, progress_bar, targets_dir


class ComfyClipVision:
    """privdiff's ImageEncoder over ComfyUI's CLIP_VISION, differentiable (ComfyUI's own preprocessing rounds
    pixels to 8 bits, which has no gradient; this one resizes, crops and normalises the same way without it)."""

    def __init__(self, clip_vision) -> None:
        self.clip_vision = clip_vision
        self.model = clip_vision.model
        self.size = int(clip_vision.image_size)
        self.mean, self.std = tuple(clip_vision.image_mean), tuple(clip_vision.image_std)
        projection = self.model.visual_projection.weight
        self.dim = int(projection.shape[0])
        self.identity = weight_identity("CLIP vision", self.dim, projection)

    def to(self, device: str | torch.device) -> ComfyClipVision:
        """ComfyUI's model management places the weights; nothing to do."""
        return self

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        device = self.clip_vision.load_device
        pixels = clip_preprocess(images.to(device, torch.float32), self.size, self.mean, self.std)
        return self.model(pixel_values=pixels, intermediate_output=-2)[2].float()


@contextmanager
def guidance_session(model, vae, clip_vision) -> Iterator[tuple[ComfyBackend, ComfyClipVision]]:
    """UNet, VAE decoder and CLIP vision loaded and ready to back-propagate through, inside ComfyUI's prompt."""
    with torch.inference_mode(False), torch.enable_grad():
        comfy.model_management.load_models_gpu([model, vae.patcher, clip_vision.patcher], force_full_load=True)
        with gradient_session([model.model, vae.first_stage_model, clip_vision.model]):
            yield ComfyBackend(model, None, vae), ComfyClipVision(clip_vision)


def conditioning(backend: ComfyBackend, cond: list, height: int, width: int) -> dict[str, torch.Tensor]:
    """The first entry of a ComfyUI CONDITIONING as the backend's conditioning (cross-attention, and SDXL's
    size conditioning from its pooled output)."""
    tensor, extra = cond[0][0], cond[0][1]
    out = {"c_crossattn": tensor.to(backend.device)}
    if backend.base.adm_channels:
        out["y"] = backend.base.encode_adm(pooled_output=extra["pooled_output"].to(backend.device), width=width,
                                           height=height, crop_w=0, crop_h=0, target_width=width,
                                           target_height=height)
    return out


def _batched(cond: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """Conditioning repeated to the latent batch (ComfyUI conditions a whole batch with one prompt)."""
    return {k: v if len(v) == n else v[:1].expand(n, *v.shape[1:]) for k, v in cond.items()}


class PrivdiffDPStyleTarget(io.ComfyNode):
    """Releases a DP style target (the noisy mean of the private images' unit CLIP image embeddings)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PrivdiffDPStyleTarget",
            display_name="DP Style Target",
            category=CATEGORY,
            description="Turn private images into one DP style target for guided sampling: each image's CLIP "
                        "image embedding, normalised, averaged with calibrated Gaussian noise. Writes "
                        "models/privdiff_targets/<name>.safetensors with its privacy report.",
            inputs=[
                Dataset.Input("dataset", tooltip="From Load Private Images."),
                io.ClipVision.Input("clip_vision", tooltip="The image encoder (Load CLIP Vision); sampling must "
                                                           "use the same one."),
                io.String.Input("name", default="my_dp_target", tooltip="File name in models/privdiff_targets."),
                io.Float.Input("epsilon", default=4.0, min=0.01, max=1000.0, step=0.01, round=False,
                               tooltip="Privacy budget epsilon of this release."),
                io.Float.Input("delta", default=1e-5, min=1e-12, max=0.1, step=1e-6, round=False,
                               tooltip="Privacy delta; must be below 1/N for N private images."),
                io.Float.Input("sample_rate", default=1.0, min=0.001, max=1.0, step=0.001, round=False,
                               tooltip="Poisson sampling rate q."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing target of that name."),
                *optional_release_inputs(),
            ],
            outputs=[io.String.Output("report", display_name="privacy report", tooltip="The release's privacy report."),
                     io.String.Output("target", display_name="target name",
                                      tooltip="Link to DP Guided Sampler's target input.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, dataset, clip_vision, name: str, epsilon: float, delta: float, sample_rate: float,
                overwrite: bool, **optional) -> io.NodeOutput:
        release = Release(name=name.strip(), epsilon=epsilon, delta=delta, sample_rate=sample_rate, clip_norm=1.0,
                          bound="normalize", prompt_template="{}", overwrite=overwrite, **optional)
        with torch.inference_mode(False):
            comfy.model_management.load_models_gpu([clip_vision.patcher], force_full_load=True)
            report, target = make_style_target(ComfyClipVision(clip_vision), dataset, release, targets_dir(),
                                               progress_bar(), default_ledger())
        return io.NodeOutput(report, target)


class PrivdiffGuidedSampler(io.ComfyNode):
    """DDIM with universal guidance toward a DP style target, in place of KSampler."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PrivdiffGuidedSampler",
            display_name="DP Guided Sampler",
            category=CATEGORY,
            description="Sample toward a DP style target with universal guidance: each step decodes the predicted "
                        "image, embeds it with CLIP vision and follows the gradient of its cosine to the target "
                        "(through UNet, VAE and encoder). DDIM from pure noise; uses the first entry of each "
                        "conditioning (no area or ControlNet conditioning). Post-processing: spends no budget.",
            inputs=[
                io.Model.Input("model", tooltip="The checkpoint's model (SD1.x, SD2.x or SDXL)."),
                io.Conditioning.Input("positive", tooltip="Prompt conditioning (its first entry is used)."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning (its first entry is used)."),
                io.Vae.Input("vae", tooltip="Decodes the predicted image at every step (gradients flow through it)."),
                io.ClipVision.Input("clip_vision", tooltip="The encoder the target was made with."),
                io.String.Input("target", default="my_dp_target",
                                tooltip="Target name in models/privdiff_targets (or an absolute path)."),
                io.Latent.Input("latent_image", tooltip="Its size and batch are used; sampling starts from noise."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the initial noise and of the self-recurrence noise."),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip="DDIM steps."),
                io.Float.Input("cfg", default=3.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (the reference uses 3 with guidance)."),
                io.Float.Input("guidance_weight", default=6.0, min=0.0, max=1000.0, step=0.1, round=0.01,
                               tooltip="w: the pull toward the target; 0 is plain DDIM. Too large breaks images."),
                io.Int.Input("recurrence", default=6, min=1, max=100,
                             tooltip="k: passes per step (self-recurrence); cost grows k-fold."),
            ],
            outputs=[io.Latent.Output(tooltip="The guided samples; decode with VAE Decode.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, vae, clip_vision, target: str, latent_image, seed: int, steps: int,
                cfg: float, guidance_weight: float, recurrence: int) -> io.NodeOutput:
        config = GuidanceConfig(steps=steps, cfg=cfg, weight=guidance_weight, recurrence=recurrence)
        path = target_path(targets_dir(), target)
        dp_target = load_target(path)
        latent = latent_image["samples"]
        noise = comfy.sample.prepare_noise(latent, seed)
        height, width = latent.shape[-2] * 8, latent.shape[-1] * 8
        check_sample_memory(len(noise), height, width)
        with guidance_session(model, vae, clip_vision) as (backend, encoder):
            check_encoder(dp_target, encoder, path.name, "the clip_vision input")
            cond = conditioning(backend, positive, height, width)
            uncond = conditioning(backend, negative, height, width)
            cond, uncond = (_batched(c, len(noise)) for c in (cond, uncond))
            generator = torch.Generator(device=backend.device).manual_seed(seed)
            z = sample(backend, cond, uncond, noise.to(backend.device), config, generator, encoder,
                       dp_target.vector, progress_bar())
            samples = backend.base.process_latent_out(z.detach()).to(comfy.model_management.intermediate_device())
        return io.NodeOutput({"samples": samples})


class StyleGuider(comfy.samplers.CFGGuider):
    """CFG plus forward universal guidance toward a style target, for SamplerCustomAdvanced and any sampler.

    In ComfyUI's k-diffusion terms (x = x0 + σ·ε, the model returns the denoised x̂0), ε̂ ← ε̂ + √(1−ᾱ)·w·∇_z ℓ
    is x̂0 ← x̂0 − σ²·w·∇_x ℓ. The sampler owns the steps, so self-recurrence is not available here.
    """

    def __init__(self, model_patcher, vae, clip_vision, target: StyleTarget, weight: float) -> None:
        super().__init__(model_patcher)
        self.vae, self.clip_vision, self.target, self.weight = vae, clip_vision, target, weight

    def inner_sample(self, *args, **kwargs):
        with torch.inference_mode(False):
            comfy.model_management.load_models_gpu([self.vae.patcher, self.clip_vision.patcher])
            with gradient_session([self.model_patcher.model, self.vae.first_stage_model, self.clip_vision.model]):
                self.encoder = ComfyClipVision(self.clip_vision)
                return super().inner_sample(*args, **kwargs)

    def predict_noise(self, x, timestep, model_options=None, seed=None):
        model_options = {} if model_options is None else model_options
        if self.weight == 0:
            return super().predict_noise(x, timestep, model_options, seed)
        with torch.inference_mode(False), torch.enable_grad():
            x_in = x.detach().clone().requires_grad_(True)
            denoised = super().predict_noise(x_in, timestep, model_options, seed)
            latent = self.inner_model.process_latent_out(denoised)
            images = self.vae.decode(latent).movedim(-1, 1)
            embedding = self.encoder.embed(images)
            goal = self.target.vector.to(embedding.device).expand_as(embedding)
            loss = -100.0 * F.cosine_similarity(embedding, goal, dim=-1).sum()
            (grad,) = torch.autograd.grad(loss, x_in)
        sigma = timestep.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return denoised.detach() - sigma**2 * self.weight * grad.to(x.dtype)


class PrivdiffStyleGuider(io.ComfyNode):
    """A GUIDER with forward universal guidance toward a DP style target, for SamplerCustomAdvanced."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PrivdiffStyleGuider",
            display_name="DP Style Guider",
            category=CATEGORY,
            description="CFG guider plus forward universal guidance toward a DP style target, for "
                        "SamplerCustomAdvanced with any sampler and scheduler. It leaves out self-recurrence "
                        "(the sampler owns the steps): use DP Guided Sampler for the reference's k > 1.",
            inputs=[
                io.Model.Input("model", tooltip="The checkpoint's model."),
                io.Conditioning.Input("positive", tooltip="Prompt conditioning."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning."),
                io.Float.Input("cfg", default=3.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale."),
                io.Vae.Input("vae", tooltip="Decodes the predicted image at every step (gradients flow through it)."),
                io.ClipVision.Input("clip_vision", tooltip="The encoder the target was made with."),
                io.String.Input("target", default="my_dp_target",
                                tooltip="Target name in models/privdiff_targets (or an absolute path)."),
                io.Float.Input("guidance_weight", default=6.0, min=0.0, max=1000.0, step=0.1, round=0.01,
                               tooltip="w: the pull toward the target; 0 is plain CFG."),
            ],
            outputs=[io.Guider.Output(tooltip="Link to SamplerCustomAdvanced's guider input.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg: float, vae, clip_vision, target: str,
                guidance_weight: float) -> io.NodeOutput:
        path = target_path(targets_dir(), target)
        dp_target = load_target(path)
        check_encoder(dp_target, ComfyClipVision(clip_vision), path.name, "the clip_vision input")
        guider = StyleGuider(model, vae, clip_vision, dp_target, guidance_weight)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return io.NodeOutput(guider)
