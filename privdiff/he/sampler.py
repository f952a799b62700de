"""Samplers whose scheduler step runs encrypted: DDIM and PLMS (as HE-Diffusion) and Euler, over an SDBackend.

Each step: the key holder runs the UNet (classifier-free guidance and PLMS' noise combination in plaintext),
turns the prediction into an affine update (``steps``), and hands the update to ``step`` — the encrypted
stepper, or ``Update.apply`` for the plaintext sampler with the same noise. Timesteps are the guidance
sampler's (diffusers' DDIM schedule for SD). Euler works in k-diffusion's x = z / √ᾱ with σ = √((1−ᾱ)/ᾱ) on the
same timesteps, where it coincides with DDIM up to rounding (its state, and so what is encrypted, differs).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from privdiff.errors import PrivdiffError
from privdiff.he import steps
from privdiff.he.ckks import DEFAULT_PARAMS, CKKSParams, KeyHolder
from privdiff.he.noise import LatentNoise
from privdiff.he.protocol import LocalWorker, RemoteWorker
from privdiff.he.selection import CHANNELS, check_threshold
from privdiff.he.stepper import PACKINGS, EncryptedStepper, StepStats
from privdiff.io.images import half_memory
from privdiff.models.protocol import SDBackend
from privdiff.models.sampling import Cond, cfg_noise, ddim_timesteps
from privdiff.progress import Progress

SAMPLERS = ("ddim", "plms", "euler")
Step = Callable[[torch.Tensor, steps.Update], torch.Tensor]


@dataclass(frozen=True)
class HEConfig:
    """Sampling and encryption settings. The defaults are the safest configuration of the README's leak table
    (dense packing, encrypted offsets: the worker learns nothing but the public factors); HE-Diffusion's own is
    ``packing="sparse", encrypt_offsets=False``."""

    steps: int = 50
    cfg: float = 7.5
    sampler: str = "ddim"
    threshold: float = 0.01
    packing: str = "dense"
    channels: str = "reference"
    encrypt_offsets: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or not 1 <= self.steps <= 1000:
            raise PrivdiffError(f"steps must be an integer in 1..1000, got {self.steps!r}")
        if not math.isfinite(self.cfg) or self.cfg < 0:
            raise PrivdiffError(f"cfg must be a finite number >= 0, got {self.cfg!r}")
        for name, value, allowed in (("sampler", self.sampler, SAMPLERS), ("packing", self.packing, PACKINGS),
                                     ("channels", self.channels, CHANNELS)):
            if value not in allowed:
                raise PrivdiffError(f"{name}={value!r} is not one of {', '.join(allowed)}")
        check_threshold(self.threshold)


def sample(backend: SDBackend, cond: Cond, uncond: Cond, latents: torch.Tensor, config: HEConfig, step: Step,
           progress: Progress | None = None) -> torch.Tensor:
    """Final latents (float32) from initial noise ``latents`` [B,4,h,w]; every scheduler update goes through
    ``step``. ``progress(done, total)`` is called after each step and may raise to cancel."""
    alphas = backend.alphas_cumprod.to(torch.float64).cpu()
    schedule = ddim_timesteps(len(alphas), config.steps)

    def alpha(t: int) -> float:
        return float(alphas[t] if t >= 0 else alphas[0])

    def eps_at(z: torch.Tensor, t: int) -> torch.Tensor:
        with torch.no_grad():
            return cfg_noise(backend, z, t, cond, uncond, config.cfg).float()

    z = latents.float()
    history: list[torch.Tensor] = []
    for i, (t, t_prev) in enumerate(schedule):
        a, a_prev = alpha(t), alpha(t_prev)
        eps = eps_at(z, t)
        if config.sampler == "euler":
            sigma, sigma_next = math.sqrt((1 - a) / a), math.sqrt((1 - a_prev) / a_prev)
            x = z / math.sqrt(a)
            x = step(x, steps.euler(x - sigma * eps, sigma, sigma_next))
            z = (x * math.sqrt(a_prev)).float()
        else:
            used = eps
            if config.sampler == "plms":
                if not history:  # the first step averages ε̂ with ε̂ at a plaintext DDIM look-ahead
                    ahead = steps.ddim(eps, a, a_prev).apply(z)
                    used = (eps + eps_at(ahead.float(), t_prev if t_prev >= 0 else 0)) / 2
                else:
                    used = steps.plms_eps(eps, history)
                history = [*history[-2:], eps]
            z = step(z, steps.ddim(used, a, a_prev)).float()
        if progress is not None:
            progress(i + 1, len(schedule))
    return z


def report(config: HEConfig, stats: StepStats, params: str, mode: str, noise: LatentNoise,
           sampler: str | None = None) -> str:
    """The report string: settings, what was encrypted, where the noise came from, and what each party saw (the
    threat model); ``sampler`` names the host's sampler where it is not one of :data:`SAMPLERS`."""
    offsets = ("encrypted" if config.encrypt_offsets else
               "in plaintext (they carry the model's noise prediction for those elements)")
    where = ("dense packing: every element, positions implicit" if config.packing == "dense" else
             f"sparse packing: {stats.fraction:.1%} of the elements on average (HILL threshold {config.threshold:g}, "
             f"{config.channels} filtering), with their positions")
    return "\n".join([
        f"privdiff encrypted denoising: {sampler or config.sampler}, {config.steps} steps, CFG {config.cfg:g}; "
        f"CKKS {params}; {mode}",
        f"encrypted each step: {where}",
        f"HE overhead: {stats.seconds / max(stats.steps, 1) * 1e3:.1f} ms per step; "
        f"{(stats.sent + stats.received) / max(stats.steps, 1) / 1e6:.2f} MB per step between the roles",
        noise.describe(),
        "key holder (secret key; runs the UNet): sees everything — the prompt, every latent, every prediction.",
        f"worker (public context only): sees the ciphertexts, the public factor of each update, the plaintext "
        f"remainder{' and its positions' if config.packing == 'sparse' else ''}, and the offsets {offsets}.",
        "not hidden from whoever runs the UNet: the whole latent at every step (the UNet needs it in plaintext).",
    ])


def describe(params: CKKSParams) -> str:
    return (f"N={params.poly_modulus_degree}, primes {list(params.coeff_mod_bit_sizes)}, "
            f"scale 2**{params.scale_bits}")


# Bytes per element, measured on the tiny and small models with margin (float32 activations kept alive at once):
UNET_BYTES = 4 * 32  # per latent position, per channel of the UNet's first block, per batch row (CFG doubles rows)
VAE_BYTES = 4 * 8  # per output pixel, per channel of the VAE decoder's last block
PIXEL_BYTES = 4 * 3 * 3  # per output pixel: the decoded float32 image, its copy on the CPU and its 8-bit PNG rows
HE_COPIES = 6  # a step's ciphertexts live as TenSEAL objects, serialised, in the frame and in the reply
PLAIN_BYTES = 8 * 12  # per latent element: the key holder's float64 state, offsets, expectations and results


def memory_need(backend: SDBackend, num_images: int, size: tuple[int, int], vae_factor: int,
                encrypt_offsets: bool = True, params: CKKSParams = DEFAULT_PARAMS) -> tuple[int, int]:
    """Estimated peak bytes of ``sample_images``: (on the model's device: UNet and VAE activations, on the CPU:
    ciphertexts, the key holder's arrays and the decoded images)."""
    height, width = size
    latent, pixels = (height // vae_factor) * (width // vae_factor), height * width
    pipe = getattr(backend, "pipe", None)
    unet = pipe.unet.config.block_out_channels[0] if pipe is not None else 320  # SD's widths where unknown
    vae = pipe.vae.config.block_out_channels[0] if pipe is not None else 128
    model = max(2 * num_images * latent * unet * UNET_BYTES, num_images * pixels * vae * VAE_BYTES)
    per_value = 32 * (len(params.coeff_mod_bit_sizes) - 1) * (2 if encrypt_offsets else 1) * HE_COPIES
    host = num_images * 4 * latent * (per_value + PLAIN_BYTES) + num_images * pixels * PIXEL_BYTES
    return model, host


def check_memory(backend: SDBackend, num_images: int, size: tuple[int, int], vae_factor: int,
                 encrypt_offsets: bool = True, params: CKKSParams = DEFAULT_PARAMS) -> None:
    """Refuse, in one line saying how many images of that size fit, a batch whose ``memory_need`` exceeds half
    of this machine's memory (or, for the model's part, a CUDA device's memory)."""
    model, host = memory_need(backend, num_images, size, vae_factor, encrypt_offsets, params)
    half = half_memory()
    device = torch.device(backend.device)
    ram = "of this machine's memory (half)"
    if device.type == "cuda":
        limits = [(host, half, ram), (model, torch.cuda.get_device_properties(device).total_memory,
                                      f"of {device}'s memory")]
    else:
        limits = [(host + model, half, ram)]
    for need, limit, where in limits:
        if limit is not None and need > limit:
            fit = limit * num_images // need
            raise PrivdiffError(
                f"{num_images} image(s) of {size[0]}x{size[1]} need about {need / 2**30:,.1f} GiB, over the "
                f"{limit / 2**30:,.1f} GiB {where}; " + (f"at most {fit} image(s) of that size fit" if fit else
                                                          "lower the height and width"))


def sample_images(backend: SDBackend, prompt: str, negative_prompt: str, num_images: int, size: tuple[int, int],
                  config: HEConfig, seed: int | None = None, worker: str | None = None,
                  params: CKKSParams = DEFAULT_PARAMS, progress: Progress | None = None, vae_factor: int = 8,
                  holder: KeyHolder | None = None) -> tuple[torch.Tensor, str]:
    """Images [N,3,H,W] in 0..1 and the report string: key holder here (``holder``, or a new one with
    ``params``), worker in this process or at ``worker`` (HOST:PORT). The backend needs ``encode_text``.
    The initial noise is secret (``seed`` None) or reproducible from ``seed`` (see ``LatentNoise``)."""
    height, width = size
    if height % vae_factor or width % vae_factor:
        raise PrivdiffError(f"height/width {height}x{width} must be multiples of {vae_factor} for this model")
    params = holder.params if holder else params
    check_memory(backend, num_images, size, vae_factor, config.encrypt_offsets, params)
    holder = holder or KeyHolder(params)
    link = RemoteWorker(worker, holder.public_context()) if worker else LocalWorker(holder.public_context())
    try:
        stepper = EncryptedStepper(holder, link, config.threshold, config.packing, config.channels,
                                   config.encrypt_offsets)
        cond = backend.encode_text([prompt] * num_images, size=size)
        uncond = backend.encode_text([negative_prompt] * num_images, size=size)
        noise = LatentNoise(seed)
        latents = noise((num_images, 4, height // vae_factor, width // vae_factor))
        z = sample(backend, cond, uncond, latents.to(backend.device), config, stepper, progress)
    finally:
        link.close()
    mode = f"worker at {worker}" if worker else "both roles in this process"
    with torch.no_grad():
        return backend.decode_latents(z.to(backend.dtype)).float().cpu(), report(config, stepper.stats,
                                                                                  describe(params), mode, noise)
