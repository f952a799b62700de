"""Universal guidance (Bansal et al. 2023) toward a style target: DDIM with forward guidance and self-recurrence.

At each DDIM step t (ᾱ = ᾱ_t) and each of ``recurrence`` passes:
  ε̂ = classifier-free guided noise prediction at z_t;
  x̂0 = (z_t − √(1−ᾱ)·ε̂)/√ᾱ; ℓ = −scale·cos(E(decode(x̂0)), target);
  ε̂ ← ε̂ + √(1−ᾱ)·w·∇_{z_t}ℓ   (the gradient flows through UNet, VAE decoder and image encoder);
  z_{t−1} = DDIM(z_t, ε̂) (η = 0);
  unless it is the last pass: z_t ← √(ᾱ_t/ᾱ_{t−1})·z_{t−1} + √(1−ᾱ_t/ᾱ_{t−1})·n, n ~ N(0, I).
Timesteps follow diffusers' DDIM with SD's configuration ("leading" spacing, steps_offset 1, final
ᾱ = ᾱ_0), so w = 0, k = 1 is exactly the plain DDIM sampler. Sampling is post-processing of the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from privdiff.errors import PrivdiffError
from privdiff.models.image_encoders import ImageEncoder
from privdiff.models.protocol import SDBackend
from privdiff.models.sampling import Cond, cfg_noise, ddim_timesteps
from privdiff.progress import Progress


@dataclass(frozen=True)
class GuidanceConfig:
    """Sampling and guidance settings; the reference's style runs use w = 6, k = 6, CFG 3."""

    steps: int = 50
    cfg: float = 3.0
    weight: float = 6.0
    recurrence: int = 6
    loss_scale: float = 100.0

    def __post_init__(self) -> None:
        for name, value, ok in (("steps", self.steps, 1 <= self.steps <= 1000),
                                ("cfg", self.cfg, math.isfinite(self.cfg) and self.cfg >= 0),
                                ("guidance weight", self.weight, math.isfinite(self.weight) and self.weight >= 0),
                                ("recurrence", self.recurrence, 1 <= self.recurrence <= 100),
                                ("loss scale", self.loss_scale, math.isfinite(self.loss_scale))):
            if not ok:
                raise PrivdiffError(f"invalid {name} {value!r}")


def pixel_bytes(decoder_channels: int = 0) -> int:
    """Memory per output pixel of guided sampling: the decoded batch, its gradient, the encoder's resized copy
    and the images kept (float32 RGB, 4 copies), plus the VAE decoder's full-resolution activations kept for
    the backward pass (about 16 maps of ``decoder_channels``; 0 where the decoder is not known yet)."""
    return 4 * (3 * 4 + 16 * decoder_channels)


def decoder_channels(backend: object) -> int:
    """The channels of a diffusers VAE decoder's full-resolution stage (0 where the backend does not say)."""
    vae = getattr(getattr(backend, "pipe", None), "vae", None)
    widths = getattr(getattr(vae, "config", None), "block_out_channels", None) or (0,)
    return int(widths[0])


def check_sample_memory(num_images: int, height: int, width: int, decoder: int = 0,
                        device: str | torch.device | None = None) -> None:
    """Refuse ``num_images`` images of ``height`` x ``width`` when guided sampling would need over half of this
    machine's memory (or more than the GPU ``device`` has), saying how many fit."""
    from privdiff.io import images

    per_image = height * width * pixel_bytes(decoder)
    budget, where = images.half_memory(), "half of this machine's memory"
    if device is not None and torch.device(device).type == "cuda":
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        if budget is None or total < budget:
            budget, where = total, f"the memory of {device}"
    if budget is None or num_images * per_image <= budget:
        return
    fits = budget // per_image
    advice = f"at most {fits} image(s) of that size fit" if fits else "not one image of that size fits: make it smaller"
    advice += "" if decoder else " (fewer once the model's decoder is counted)"
    raise PrivdiffError(f"{num_images} image(s) of {height}x{width} need about {num_images * per_image / 2**20:,.0f} "
                        f"MiB for guided sampling, over {where} ({budget / 2**20:,.0f} MiB); {advice}")


def _alpha(alphas: torch.Tensor, t: int) -> torch.Tensor:
    return alphas[t] if t >= 0 else alphas[0]


def guided_noise(backend: SDBackend, z: torch.Tensor, t: int, cond: Cond, uncond: Cond, config: GuidanceConfig,
                 encoder: ImageEncoder | None = None, target: torch.Tensor | None = None) -> torch.Tensor:
    """ε̂ at z_t: classifier-free guided, plus the forward-guidance term when ``config.weight`` > 0."""
    a = backend.alphas_cumprod[t].to(torch.float32)
    guide = config.weight > 0
    with torch.inference_mode(False), torch.enable_grad():
        z = z.detach().clone().requires_grad_(guide)
        eps = cfg_noise(backend, z, t, cond, uncond, config.cfg)
        if not guide:
            return eps.detach()
        if encoder is None or target is None:
            raise PrivdiffError("guidance weight > 0 needs an image encoder and a target")
        loss = guidance_loss(backend, encoder, target, z, eps, a, config.loss_scale)
        (grad,) = torch.autograd.grad(loss, z)
    return eps.detach() + (1 - a).sqrt() * config.weight * grad


def guidance_loss(backend: SDBackend, encoder: ImageEncoder, target: torch.Tensor, z: torch.Tensor,
                  eps: torch.Tensor, a: torch.Tensor, scale: float) -> torch.Tensor:
    """ℓ summed over the batch: −scale·cos(E(decode(x̂0)), target), x̂0 = (z − √(1−ᾱ)ε̂)/√ᾱ."""
    x0 = (z - (1 - a).sqrt() * eps) / a.sqrt()
    embedding = encoder.embed(backend.decode_latents(x0).float())
    goal = target.to(embedding.device, embedding.dtype).expand_as(embedding)
    return -scale * F.cosine_similarity(embedding, goal, dim=-1).sum()


def sample(
    backend: SDBackend,
    cond: Cond,
    uncond: Cond,
    latents: torch.Tensor,
    config: GuidanceConfig,
    generator: torch.Generator,
    encoder: ImageEncoder | None = None,
    target: torch.Tensor | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Guided DDIM from initial noise ``latents`` [B,4,h,w]; returns the final latents (float32).

    ``cond``/``uncond`` are the backend's conditioning for the prompt and the negative prompt, batch B;
    ``generator`` draws the self-recurrence noise (on the latents' device).
    """
    if uncond.keys() != cond.keys():
        raise PrivdiffError("conditioning and negative conditioning come from different models")
    alphas = backend.alphas_cumprod.to(torch.float32)
    schedule = ddim_timesteps(len(alphas), config.steps)
    total, done = len(schedule) * config.recurrence, 0
    z = latents.float()
    for t, t_prev in schedule:
        a, a_prev = alphas[t], _alpha(alphas, t_prev)
        for r in range(config.recurrence):
            eps = guided_noise(backend, z, t, cond, uncond, config, encoder, target)
            x0 = (z - (1 - a).sqrt() * eps) / a.sqrt()
            z_prev = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
            if r < config.recurrence - 1:
                noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
                z = (a / a_prev).sqrt() * z_prev + (1 - a / a_prev).sqrt() * noise
            done += 1
            if progress is not None:
                progress(done, total)
        z = z_prev
    return z


def sample_images(
    backend: SDBackend,
    prompt: str,
    negative_prompt: str,
    num_images: int,
    size: tuple[int, int],
    config: GuidanceConfig,
    seed: int,
    encoder: ImageEncoder | None = None,
    target: torch.Tensor | None = None,
    progress: Progress | None = None,
    vae_factor: int = 8,
) -> torch.Tensor:
    """Images [N,3,H,W] in 0..1 for ``prompt`` at ``size`` (height, width), guided toward ``target``.

    The backend needs ``encode_text`` (plain prompts) besides the SDBackend protocol. The initial noise
    and the recurrence noise come from a generator seeded with ``seed``: the same seed gives the same
    images (this is sampling, not a release: it spends no budget).
    """
    height, width = size
    if height % vae_factor or width % vae_factor:
        raise PrivdiffError(f"height/width {height}x{width} must be multiples of {vae_factor} for this model")
    device = backend.device
    cond = backend.encode_text([prompt] * num_images, size=size)
    uncond = backend.encode_text([negative_prompt] * num_images, size=size)
    generator = torch.Generator(device).manual_seed(seed)
    latents = torch.randn(num_images, 4, height // vae_factor, width // vae_factor, generator=generator,
                          device=device)
    z = sample(backend, cond, uncond, latents, config, generator, encoder, target, progress=progress)
    with torch.no_grad():
        return backend.decode_latents(z)
