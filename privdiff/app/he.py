"""Encrypted scheduler steps for k-diffusion-style samplers (the ComfyUI node's plain logic, no ComfyUI needed).

The sampler owns the loop: ``denoise(x, sigma)`` is the host's denoiser (classifier-free guidance included),
its prediction becomes an affine update (``privdiff.he.steps``), and ``step`` applies it — the encrypted
stepper, or ``Update.apply`` for the plaintext sampler with the same noise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from privdiff.errors import PrivdiffError
from privdiff.he import steps
from privdiff.he.ckks import DEFAULT_PARAMS, CKKSParams, KeyHolder
from privdiff.he.noise import LatentNoise
from privdiff.he.protocol import LocalWorker, RemoteWorker, parse_address
from privdiff.he.sampler import HEConfig, describe, report
from privdiff.he.stepper import EncryptedStepper, StepStats
from privdiff.progress import Progress

# ComfyUI's names; its "ddim" is Euler steps (DDIM's own on the ddim_uniform schedule).
SAMPLERS = ("euler", "euler_ancestral", "ddim")
Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseSampler = Callable[[float, float], torch.Tensor]
Step = Callable[[torch.Tensor, steps.Update], torch.Tensor]


def check_sampler(sampler: str) -> str:
    """The sampler name, or a one-line error."""
    if sampler not in SAMPLERS:
        raise PrivdiffError(f"sampler {sampler!r} has no encrypted step; use one of {', '.join(SAMPLERS)}")
    return sampler


def sample(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, step: Step, sampler: str = "euler",
           noise: NoiseSampler | None = None, progress: Progress | None = None) -> torch.Tensor:
    """The state after every step from ``sigmas[0]`` to ``sigmas[-1]``, starting at ``x`` (already scaled to
    ``sigmas[0]``). ``denoise(x, sigmas[i])`` returns the prediction of the clean state; Euler ancestral draws
    ``noise(sigma, sigma_next)`` on every step that does not end at sigma 0 (as k-diffusion does).
    ``progress(done, total)`` is called after each step and may raise to cancel."""
    check_sampler(sampler)
    if sampler == "euler_ancestral" and noise is None:
        raise PrivdiffError("euler_ancestral needs a noise sampler")
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        if sigma <= 0:
            raise PrivdiffError(f"sigma {sigma:g} at step {i + 1} is not positive: only the last sigma may be 0")
        denoised = denoise(x, sigmas[i])
        if sampler == "euler_ancestral" and sigma_next > 0:
            update = steps.euler_ancestral(denoised, sigma, sigma_next, noise(sigma, sigma_next))
        else:
            update = steps.euler(denoised, sigma, sigma_next)
        x = step(x, update)
        if progress is not None:
            progress(i + 1, total)
    return x


def check_worker(worker: str) -> str:
    """The worker address stripped ("" for both roles in this process), or a one-line error."""
    worker = worker.strip()
    if worker:
        parse_address(worker, what="worker address")
    return worker


@contextmanager
def encrypted_stepper(config: HEConfig, worker: str = "",
                      params: CKKSParams = DEFAULT_PARAMS) -> Iterator[EncryptedStepper]:
    """A key holder here and its stepper, with the worker in this process (``worker`` empty) or at HOST:PORT;
    the connection closes on exit."""
    worker = check_worker(worker)
    holder = KeyHolder(params)
    link = RemoteWorker(worker, holder.public_context()) if worker else LocalWorker(holder.public_context())
    try:
        yield EncryptedStepper(holder, link, config.threshold, config.packing, config.channels,
                               config.encrypt_offsets)
    finally:
        link.close()


NOISE_SOURCES = ("secret", "seed")


def latent_noise(source: str, seed: int) -> LatentNoise:
    """The run's noise: ``secret`` (a 256-bit key, not recorded) or reproducible from ``seed``."""
    if source not in NOISE_SOURCES:
        raise PrivdiffError(f"noise {source!r} is not one of {', '.join(NOISE_SOURCES)}")
    return LatentNoise(seed if source == "seed" else None)


def sampler_report(config: HEConfig, stats: StepStats, sampler: str, scheduler: str, denoise: float,
                   noise: LatentNoise, worker: str = "", params: CKKSParams = DEFAULT_PARAMS) -> str:
    """The report of one run: the host's sampler and schedule, what was encrypted, the noise, and what each party
    saw."""
    where = f"worker at {worker.strip()}" if worker.strip() else "both roles in this process"
    mode = f"ComfyUI scheduler {scheduler}, denoise {denoise:g}; {where}"
    return report(config, stats, describe(params), mode, noise, sampler)
