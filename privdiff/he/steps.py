"""Scheduler steps as affine updates: state' = factor * state + offset, given the model's prediction.

Every sampler here is affine in its state once the prediction is known, which is what lets the update run on
a ciphertext. ``factor`` is a public function of the schedule; ``offset`` carries the prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Update:
    factor: float
    offset: torch.Tensor

    def apply(self, state: torch.Tensor) -> torch.Tensor:
        """The plaintext update."""
        return self.factor * state + self.offset


def ddim(eps: torch.Tensor, alpha: float, alpha_prev: float) -> Update:
    """DDIM (eta 0) from ᾱ_t to ᾱ_prev: z' = √(ᾱ'/ᾱ) z + (√(1−ᾱ') − √(ᾱ'/ᾱ)√(1−ᾱ)) ε̂."""
    factor = math.sqrt(alpha_prev / alpha)
    return Update(factor, (math.sqrt(1 - alpha_prev) - factor * math.sqrt(1 - alpha)) * eps)


def plms_eps(eps: torch.Tensor, history: list[torch.Tensor]) -> torch.Tensor:
    """PLMS' combined noise (Liu et al. 2022, as in CompVis' sampler) from ε̂ and up to 3 earlier ε̂ (oldest
    first); the first step (no history) is handled by the caller with a second prediction."""
    if len(history) == 1:
        return (3 * eps - history[-1]) / 2
    if len(history) == 2:
        return (23 * eps - 16 * history[-1] + 5 * history[-2]) / 12
    return (55 * eps - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24


def euler(denoised: torch.Tensor, sigma: float, sigma_next: float) -> Update:
    """Euler in k-diffusion's x-space: x' = x + (σ' − σ)(x − D)/σ = (σ'/σ) x + (1 − σ'/σ) D."""
    factor = sigma_next / sigma
    return Update(factor, (1 - factor) * denoised)


def euler_ancestral(denoised: torch.Tensor, sigma: float, sigma_next: float, noise: torch.Tensor,
                    eta: float = 1.0) -> Update:
    """Euler ancestral (k-diffusion): an Euler step to σ_down, plus σ_up fresh noise (in the offset)."""
    up = min(sigma_next, eta * math.sqrt(max(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2, 0.0)))
    down = math.sqrt(sigma_next**2 - up**2)
    step = euler(denoised, sigma, down)
    return Update(step.factor, step.offset + up * noise if sigma_next > 0 else step.offset)
