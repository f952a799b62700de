"""The denoising pieces every sampler shares: diffusers' DDIM timestep pairs and the classifier-free guided ε̂.

Used by universal guidance (``privdiff.guidance.sampler``), the encrypted HE samplers (``privdiff.he.sampler``)
and the spectral img2img refinement (``privdiff.wavelet.upsample``).
"""

from __future__ import annotations

import torch

from privdiff.errors import PrivdiffError
from privdiff.models.protocol import SDBackend

Cond = dict[str, torch.Tensor]
"""Text conditioning as ``SDBackend.encode_text`` returns it."""


def ddim_timesteps(num_train: int, steps: int) -> list[tuple[int, int]]:
    """(t, t_prev) pairs of diffusers' DDIM schedule for SD ("leading", offset 1); t_prev −1 means ᾱ_0."""
    if steps > num_train:
        raise PrivdiffError(f"steps {steps} is more than the model's {num_train} training timesteps")
    ratio = num_train // steps
    ts = [i * ratio + 1 for i in reversed(range(steps))]
    return [(t, t - ratio) for t in ts]


def cfg_noise(backend: SDBackend, z: torch.Tensor, t: int, cond: Cond, uncond: Cond, scale: float) -> torch.Tensor:
    """Classifier-free guided ε̂ (conditional and unconditional in one batch), converted from v if needed."""
    b = len(z)
    both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
    timesteps = torch.full((2 * b,), t, dtype=torch.long, device=z.device)
    out = backend.predict_noise(torch.cat([z, z]), timesteps, both).float()
    if backend.prediction_type == "v_prediction":
        a = backend.alphas_cumprod[t].to(torch.float32)
        out = a.sqrt() * out + (1 - a).sqrt() * torch.cat([z, z]).float()
    eps_c, eps_u = out[:b], out[b:]
    return eps_u + scale * (eps_c - eps_u)
