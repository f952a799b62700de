"""DP-SGD's optimizer step with privdiff's bounding and noise (shared by every DP-SGD trainer).

opacus computes the per-sample gradients (``GradSampleModule``) and runs the optimizer; this subclass
replaces its float32 clipping and torch noise: per-sample gradients are clipped and summed in float64 by
``clipped_sum`` and the sum is noised by ``noisy_sum`` from a ``SecureRandom`` (its own stream, each step's
noise drawn while the step before computes: ``NoiseAhead``).
"""

from __future__ import annotations

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from privdiff.privacy.mechanism import clipped_sum, noisy_sum
from privdiff.privacy.randomness import NoiseAhead, SecureRandom


class PrivdiffDPOptimizer(DPOptimizer):
    """opacus' ``DPOptimizer`` with privdiff's bounding and noise instead of opacus' float32 clip and torch noise.

    Each example's gradient (all parameters together) is clipped to ``max_grad_norm`` and summed in float64 by
    ``clipped_sum``; the noise is one ``noisy_sum`` over all parameters, from a stream spawned from ``rng``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, rng: SecureRandom, **kwargs: object) -> None:
        super().__init__(optimizer, **kwargs)
        self.rng = rng
        self.noise = NoiseAhead(rng)

    def close(self) -> None:
        """Stop the noise thread; call when training ends."""
        self.noise.close()

    def _sizes(self) -> list[int]:
        return [p.numel() for p in self.params]

    def clip_and_accumulate(self) -> None:
        """``p.summed_grad`` (float64) += the sum of the float64-clipped per-sample gradients."""
        for p in self.params:
            _check_processed_flag(p.grad_sample)
        for p, grad in zip(self.params, clipped_sum(self.grad_samples, self.max_grad_norm), strict=True):
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)

    def add_noise(self) -> None:
        """``p.grad`` = the noisy sum (``noisy_sum``, sensitivity ``max_grad_norm``) in the parameter's dtype."""
        for p in self.params:
            _check_processed_flag(p.summed_grad)
        total = torch.cat([p.summed_grad.reshape(-1).to(torch.float64) for p in self.params])
        noisy = noisy_sum(total, self.max_grad_norm, self.noise_multiplier, self.noise)
        for p, part in zip(self.params, noisy.split(self._sizes()), strict=True):
            p.grad = part.view_as(p).to(p.dtype)
            _mark_as_processed(p.summed_grad)
