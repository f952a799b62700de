"""Min-distortion selection (HE-Diffusion): which latent elements to encrypt at a step.

HILL cost (Li et al. 2014, as HE-Diffusion uses it): high-pass residual with the kernel
[[-1, 2, -1], [2, -4, 2], [-1, 2, -1]] (reflect padding), absolute value, 3x3 mean, reciprocal (0 stays 0),
15x15 mean. Distortion D = |z| cost. The elements with the smallest D stay in plaintext while their sum is at
most ``threshold`` sum(D); every other element is encrypted. Each latent of a batch is selected on its own.

``channels="reference"`` (the default) filters as the released code does: its kernels span all channels, so
the residual is the sum of the channels' residuals and every channel gets the same cost map. It is the default
because the method's threshold (0.01) was chosen with it. ``channels="separate"`` filters each channel on its
own, so a channel's cost reflects its own texture.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from privdiff.errors import PrivdiffError

CHANNELS = ("reference", "separate")
_HIGH_PASS = torch.tensor([[-1.0, 2.0, -1.0], [2.0, -4.0, 2.0], [-1.0, 2.0, -1.0]])


def check_threshold(threshold: float) -> float:
    """The plaintext share of the distortion, in [0, 1)."""
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 <= threshold < 1:
        raise PrivdiffError(f"threshold must be in [0, 1), got {threshold!r}")
    return float(threshold)


def _mean_filter(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.avg_pool2d(_reflect(x, size), size, stride=1)


def _reflect(x: torch.Tensor, size: int) -> torch.Tensor:
    pad_h, pad_w = min(size // 2, x.shape[-2] - 1), min(size // 2, x.shape[-1] - 1)
    out = F.pad(x, (pad_w, pad_w, pad_h, pad_h), mode="reflect")
    if pad_h < size // 2 or pad_w < size // 2:  # a latent smaller than the filter: replicate the rest
        out = F.pad(out, (size // 2 - pad_w,) * 2 + (size // 2 - pad_h,) * 2, mode="replicate")
    return out


def hill_cost(z: torch.Tensor, channels: str = "reference") -> torch.Tensor:
    """HILL cost map of latents [B, C, h, w] (float64, same shape)."""
    if channels not in CHANNELS:
        raise PrivdiffError(f"channels={channels!r} is not one of {', '.join(CHANNELS)}")
    if z.dim() != 4:
        raise PrivdiffError(f"latents must be [B, C, h, w], got shape {list(z.shape)}")
    x = z.detach().to(torch.float64)
    if channels == "reference":
        x = x.sum(dim=1, keepdim=True)  # the released kernels span the channels: filter the channel sum
    c = x.shape[1]
    kernel = _HIGH_PASS.to(x).expand(c, 1, 3, 3)
    residual = F.conv2d(_reflect(x, 3), kernel, groups=c).abs()
    mean = _mean_filter(residual, 3)
    inverse = torch.where(mean == 0, 0.0, 1.0 / torch.where(mean == 0, 1.0, mean))
    return _mean_filter(inverse, 15).expand_as(z).contiguous()


def select(z: torch.Tensor, threshold: float, channels: str = "reference") -> torch.Tensor:
    """Boolean mask [B, C, h, w]: True where the element is encrypted (see the module docstring)."""
    share = check_threshold(threshold)
    distortion = (z.detach().to(torch.float64).abs() * hill_cost(z, channels)).flatten(1)
    ordered, order = distortion.sort(dim=1)
    budget = share * distortion.sum(dim=1, keepdim=True)
    plain = ordered.cumsum(dim=1) <= budget  # the longest prefix of smallest D within the budget
    encrypted = torch.ones_like(distortion, dtype=torch.bool)
    encrypted.scatter_(1, order, ~plain)
    return encrypted.view(z.shape)
