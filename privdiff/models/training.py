"""What every method that trains against a frozen SD model shares: keyed training streams, per-image VAE latents
and the noise-prediction loss."""

from __future__ import annotations

import hashlib

import torch

from privdiff.models.protocol import SDBackend


def keyed_generator(domain: bytes, key: bytes, index: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator seeded with 64 bits of SHA-256(``domain``, ``key``, ``index``), for training randomness
    the privacy guarantee does not rely on (VAE sampling, templates, timesteps, diffusion noise). ``key`` comes
    from the release's CSPRNG; keyed by the record, a stream does not depend on the process or order that uses it.
    Poisson sampling and DP noise never draw from it."""
    digest = hashlib.sha256(domain + key + int(index).to_bytes(8, "little")).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little"))


def encode_each(backend: SDBackend, images: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """VAE latents of ``images``, each encoded alone (a batch of one: the same shape for every image) with its own
    generator, on the CPU."""
    with torch.no_grad():
        latents = [backend.encode_images(images[i:i + 1].to(backend.device, backend.dtype), g)
                   for i, g in enumerate(generators)]
    return torch.cat([z.float().cpu() for z in latents])


def noise_prediction_loss(backend: SDBackend, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                          cond: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-example noise-prediction MSE [B] of the model conditioned on ``cond``: clean latents ``x0`` [B, ...],
    integer timesteps ``t`` [B], forward-process ``noise``; the target follows the prediction type (ε or v)."""
    device = x0.device
    t, noise = t.to(device), noise.to(device, x0.dtype)
    a = backend.alphas_cumprod.to(device, torch.float32)[t].view(-1, *([1] * (x0.dim() - 1)))
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    target = a.sqrt() * noise - (1 - a).sqrt() * x0 if backend.prediction_type == "v_prediction" else noise
    pred = backend.predict_noise(noisy.to(backend.dtype), t, cond).float()
    return (pred - target).pow(2).flatten(1).mean(1)
