"""DP-SGD's optimizer step with privdiff's bounding and noise (shared by every DP-SGD trainer).

opacus computes the per-sample gradients (``GradSampleModule``) and runs the optimizer; this subclass
replaces its float32 clipping and torch noise: per-sample gradients are clipped and summed in float64 by
``clipped_sum`` and the sum is noised by ``noisy_sum`` from a ``SecureRandom`` (its own stream, each step's
noise drawn while the step before computes: ``NoiseAhead``; on a GPU the noise is drawn there: ``DeviceNoise``).

An example's per-sample gradient must not depend on which other examples the Poisson batch holds: kernels pick
their algorithm by shape, so a batch of the sampled count would move every example's gradient (~1e-6 relative)
when one example is added or removed. ``sample_gradients`` computes them ``size`` examples at a time, always
exactly ``size`` rows (the last microbatch padded with a fixed public dummy, ``privdiff.io.batching``), drops the
dummies' rows and hands the optimizer the real rows only, so ``clipped_sum`` clips and sums them once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from privdiff.errors import PrivdiffError
from privdiff.privacy.device_noise import DeviceNoise
from privdiff.privacy.distributed import World
from privdiff.privacy.mechanism import clipped_sum, noisy_sum, pairwise_sum_
from privdiff.privacy.randomness import NoiseAhead, SecureRandom

DEVICE_NOISE = ("cuda",)  # device types whose noise is drawn on the device (float64 exp measured there)


class PrivdiffDPOptimizer(DPOptimizer):
    """opacus' ``DPOptimizer`` with privdiff's bounding and noise instead of opacus' float32 clip and torch noise.

    Each example's gradient (all parameters together) is clipped to ``max_grad_norm`` and summed in float64 by
    ``clipped_sum``; the noise is one ``noisy_sum`` over all parameters, from a stream spawned from ``rng``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, rng: SecureRandom | None, **kwargs: object) -> None:
        super().__init__(optimizer, **kwargs)
        self.rng = rng
        self.noise = None if rng is None else NoiseAhead(rng)  # None on the ranks that never add noise

    def _noise_for(self, device: torch.device) -> NoiseAhead | DeviceNoise:
        """Where a sum on ``device`` gets its noise: on a GPU, drawn there (``DeviceNoise``, keyed once from this
        optimizer's stream, whose CPU thread stops); elsewhere ahead on a CPU thread (``NoiseAhead``)."""
        if device.type in DEVICE_NOISE and isinstance(self.noise, NoiseAhead):
            self.noise.close()
            self.noise = DeviceNoise(self.noise.rng, device)
        return self.noise

    def close(self) -> None:
        """Stop the noise thread; call when training ends."""
        if isinstance(self.noise, NoiseAhead):
            self.noise.close()

    def step_across(self, world: World, compute: Callable[[], None]) -> None:
        """One DP-SGD step over the ranks of ``world`` (a lone ``World()`` is one process).

        Every rank runs ``compute`` (the per-sample gradients of its examples of the step's Poisson batch), clips
        and sums them in float64 (``clip_and_accumulate``); rank 0 adds the ranks' sums (``pairwise_sum_``: the
        error bound of docs/privacy.md, "Across ranks") and the noise once (``noisy_sum``, from its CSPRNG stream)
        and sends the noisy sum to every rank, which scales it as opacus does and steps its optimizer: the ranks'
        parameters stay identical. opacus' DistributedDPOptimizer is not used: it noises rank 0's own sum and
        all-reduces in float32 in the backend's order, which would leave the noise's grid.
        """

        def local() -> torch.Tensor:
            compute()
            self.clip_and_accumulate()
            return torch.cat([p.summed_grad.reshape(-1).to(torch.float64) for p in self.params]).cpu()

        partials = world.collect(local)
        noisy = None
        if world.leader:
            total = pairwise_sum_(torch.stack(partials))
            noisy = noisy_sum(total, self.max_grad_norm, self.noise_multiplier, self.noise)
        noisy = world.broadcast(noisy)
        for p, part in zip(self.params, noisy.split(self._sizes()), strict=True):
            p.grad = part.view_as(p).to(p.device, p.dtype)
            _mark_as_processed(p.summed_grad)
        self.scale_grad()
        self.original_optimizer.step()

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
        noisy = noisy_sum(total, self.max_grad_norm, self.noise_multiplier, self._noise_for(total.device))
        for p, part in zip(self.params, noisy.split(self._sizes()), strict=True):
            p.grad = part.view_as(p).to(p.dtype)
            _mark_as_processed(p.summed_grad)


def microbatch_size(expected_batch_size: float) -> int:
    """The fixed number of rows per-sample gradients are computed in: a public function of the expected batch size.

    A quarter of it rounded up to a power of two (at least 1): a Poisson batch then runs in about four microbatches
    and pads at most one, so the dummies cost about an eighth of the work, while each call stays large enough for
    the kernels to run efficiently.
    """
    return 1 << max(0, math.ceil(math.log2(max(1.0, expected_batch_size / 4))))


def sample_gradients(params: Sequence[torch.Tensor], rows: int, size: int,
                     backward: Callable[[int, int], None]) -> None:
    """Set each parameter's ``grad_sample`` to the per-sample gradients of ``rows`` examples, ``size`` at a time.

    ``backward(start, stop)`` runs forward and backward on examples ``start:stop`` padded to exactly ``size`` rows
    with the public dummy (rows ``stop - start`` onward), leaving each parameter's ``grad_sample`` [size, ...].
    The dummies' rows are dropped here, before anything is clipped or summed; the result has ``rows`` rows in
    order (none for an empty batch).
    """
    parts: list[list[torch.Tensor]] = [[] for _ in params]
    for start in range(0, rows, size):
        stop = min(start + size, rows)
        backward(start, stop)
        for p, part in zip(params, parts, strict=True):
            sample = p.grad_sample
            if not isinstance(sample, torch.Tensor) or sample.shape != (size, *p.shape):
                raise PrivdiffError(f"a microbatch of {size} gave per-sample gradients of shape "
                                    f"{getattr(sample, 'shape', None)} for a parameter of shape {tuple(p.shape)}")
            part.append(sample[:stop - start])
            p.grad_sample = None
    for p, part in zip(params, parts, strict=True):
        p.grad_sample = torch.cat(part) if part else p.new_zeros(0, *p.shape)
