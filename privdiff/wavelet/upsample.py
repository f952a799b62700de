"""Public super-resolution of the prior's coarse samples (post-processing: it spends no budget).

- ``load_upscaler``/``upscale``: the upscaler files ComfyUI and A1111 users have (ESRGAN, SwinIR, ...),
  loaded with spandrel, an optional dependency (it imports torchvision).
- ``refine``: an SD img2img pass through any SDBackend (DDIM from a partly noised latent of the resized
  image, classifier-free guidance), which adds the detail the coarse image lacks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from privdiff.errors import PrivdiffError
from privdiff.io.untrusted import regular_file
from privdiff.models.protocol import SDBackend
from privdiff.models.sampling import cfg_noise, ddim_timesteps


def load_upscaler(path: str | Path) -> torch.nn.Module:
    """An image super-resolution model file spandrel recognises; one-line errors otherwise."""
    regular_file(path, "upscaler")  # a FIFO or folder is refused by kind, never opened
    try:
        import spandrel
    except Exception as exc:  # spandrel imports torchvision, which may be missing or broken
        raise PrivdiffError(f"upscalers need spandrel, which cannot be imported here ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:160]}); install spandrel with a working torchvision, "
                            "or refine with an SD model instead") from exc
    try:
        descriptor = spandrel.ModelLoader().load_from_file(str(path))
    except Exception as exc:
        raise PrivdiffError(f"spandrel cannot read upscaler {path}: {' '.join(str(exc).split())[:200]}") from exc
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise PrivdiffError(f"{path} is a {type(descriptor).__name__}, not an image upscaler")
    return descriptor.eval()


@torch.no_grad()
def upscale(images: torch.Tensor, upscaler: torch.nn.Module) -> torch.Tensor:
    """Images [B,3,H,W] in 0..1 through a spandrel model (its own scale)."""
    device = next(upscaler.model.parameters()).device
    return upscaler(images.to(device)).float().clamp(0, 1).cpu()


def refine(
    backend: SDBackend,
    images: torch.Tensor,
    prompt: str,
    *,
    size: int,
    strength: float = 0.5,
    steps: int = 30,
    cfg: float = 5.0,
    negative_prompt: str = "",
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """SD img2img: images [B,3,h,w] resized to ``size``, noised to ``strength`` of the schedule and denoised
    with DDIM toward ``prompt``; ``progress(done, total)`` after each step (may raise to cancel). Returns
    images [B,3,size,size] in 0..1."""
    if not 0 < strength <= 1:
        raise PrivdiffError(f"strength {strength} must be in (0, 1]")
    alphas = backend.alphas_cumprod.to(torch.float32)
    schedule = [(t, tp) for t, tp in ddim_timesteps(len(alphas), steps) if t <= strength * len(alphas)]
    if not schedule:
        raise PrivdiffError(f"strength {strength} leaves no step of {steps}; raise it or the steps")
    device = backend.device
    generator = torch.Generator(device).manual_seed(seed)
    resized = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    with torch.no_grad():
        x0 = backend.encode_images(resized.to(device, backend.dtype), generator).float()
        cond = backend.encode_text([prompt] * len(images), size=(size, size))
        uncond = backend.encode_text([negative_prompt] * len(images), size=(size, size))
    a = alphas[schedule[0][0]]
    noise = torch.randn(x0.shape, generator=generator, device=device)
    z = a.sqrt() * x0 + (1 - a).sqrt() * noise
    for i, (t, t_prev) in enumerate(schedule):
        a, a_prev = alphas[t], alphas[t_prev] if t_prev >= 0 else alphas[0]
        with torch.inference_mode(False), torch.enable_grad():  # as guided sampling with weight 0
            eps = cfg_noise(backend, z.detach().clone(), t, cond, uncond, cfg).detach()
        z = a_prev.sqrt() * (z - (1 - a).sqrt() * eps) / a.sqrt() + (1 - a_prev).sqrt() * eps
        if progress is not None:
            progress(i + 1, len(schedule))
    with torch.no_grad():
        return backend.decode_latents(z).float().cpu()
