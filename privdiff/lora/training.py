"""DP-SGD on LoRA adapters: one image is one example, Poisson sampling, per-sample clipping, CSPRNG noise.

As DP-SGD textual inversion does: opacus computes the adapters' per-sample gradients (a ``GradSampleModule`` over
the UNet, whose only trainable parameters are the adapters), in microbatches of a fixed public size padded with
the public dummy (zero latent, timestep 0, zero noise), so an example's gradient does not depend on the others in
its batch; privdiff clips, sums and noises them (``PrivdiffDPOptimizer``). The text encoder and the VAE stay
frozen, and every example is conditioned on the same public prompt.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from opacus import GradSampleModule

from privdiff.errors import PrivdiffError
from privdiff.io.batching import padded
from privdiff.lora.adapters import LoRALinear, attach, check_settings, detach
from privdiff.models.protocol import SDBackend
from privdiff.models.training import encode_each, keyed_generator, noise_prediction_loss
from privdiff.privacy.distributed import World
from privdiff.privacy.dpsgd import PrivdiffDPOptimizer, microbatch_size, sample_gradients
from privdiff.privacy.mechanism import poisson_sample
from privdiff.privacy.randomness import SecureRandom
from privdiff.privacy.report import PrivacyReport
from privdiff.progress import Progress
from privdiff.release.dp_params import DPParams, plan_release

MECHANISM = "DP-LoRA (DP-SGD on UNet LoRA adapters, opacus): per-sample clipped gradients with Gaussian noise"
_STREAM = b"privdiff dp-lora example stream\0"  # each example's timestep and noise at each step
_VAE_STREAM = b"privdiff dp-lora vae sample\0"  # each image's VAE latent sample
_INIT_STREAM = b"privdiff dp-lora adapter start\0"  # the adapters' public start, the same on every rank
# torch warns on every backward through opacus' hooks when the hooked module's input needs no grad.
_HOOK_WARNING = "Full backward hook is firing"


@dataclass(frozen=True)
class LoRAConfig:
    """The adapters and their training. ``batch_size`` bounds the rows of one per-sample-gradient microbatch."""

    rank: int = 4
    alpha: float = 4.0
    targets: str = "attn"
    steps: int = 200
    lr: float = 1e-3
    batch_size: int = 16
    prompt: str = ""


@dataclass(frozen=True)
class LoRASettings:
    """The public parameters of one DP-LoRA release and the key of its per-example training streams."""

    config: LoRAConfig
    sample_rate: float
    clip_norm: float
    noise_multiplier: float
    public_size: int
    key: bytes


def per_sample_gradients(backend: SDBackend, params: list[torch.Tensor], size: int, x0: torch.Tensor,
                         t: torch.Tensor, noise: torch.Tensor, cond: dict[str, torch.Tensor]) -> None:
    """Set each adapter parameter's ``grad_sample`` to its per-example loss gradients, ``size`` examples at a
    time (the UNet wrapped by opacus; ``cond``: one example's conditioning, shared by all)."""

    def backward(start: int, stop: int) -> None:
        batch = {k: v.expand(size, *v.shape[1:]) for k, v in cond.items()}
        noise_prediction_loss(backend, padded(x0[start:stop], size), padded(t[start:stop], size),
                   padded(noise[start:stop], size), batch).sum().backward()

    sample_gradients(params, len(x0), size, backward)


def pass_rows(config: LoRAConfig, expected: int, device: torch.device) -> int:
    """The rows of one per-sample-gradient pass: a public function of the expected batch and the device type, at most
    ``config.batch_size``. On a CPU the expected batch itself: a pass's fixed cost (the UNet's many small kernels,
    opacus' hooks) outweighs its rows there, and one pass of 16 padded rows beats four of 4 (bench/dp_lora_step.py,
    small model: 0.49 s a step against 0.80 s). On a GPU a quarter of it (``microbatch_size``): rows dominate a
    pass's cost there, and the quarter pads fewer of them."""
    return min(config.batch_size, expected if device.type == "cpu" else microbatch_size(expected))


def train_dp_lora(world: World, backend: SDBackend, latents: torch.Tensor, rows: range, n: int,
                  settings: LoRASettings, rng: SecureRandom | None, progress: Progress | None = None
                  ) -> dict[str, LoRALinear]:
    """Attach adapters to ``backend``'s UNet and train them with DP-SGD for ``config.steps`` Poisson-sampled steps
    over the ranks of ``world``; this rank holds the ``latents`` of records ``rows`` of the ``n``.

    Rank 0 (``rng``: the release's CSPRNG; None elsewhere) draws each step's batch over all n records and tells
    every rank; each rank computes its batch examples' per-sample gradients, clips and sums them, and
    ``PrivdiffDPOptimizer.step_across`` adds the noise once on rank 0. The adapters' start and each example's
    timestep and noise come from streams keyed by ``settings.key``, so the adapters are the one process's, to the
    rounding of the float64 sums. Returns the adapters (still attached; on an error, or a cancel from
    ``progress``, they come off again)."""
    config = settings.config
    adapters = attach(backend.denoiser, config.rank, config.alpha, config.targets,
                      keyed_generator(_INIT_STREAM, settings.key, 0))
    try:
        _train(world, backend, latents, rows, n, settings, rng, adapters, progress)
    except BaseException:
        detach(backend.denoiser, adapters)  # a failed or cancelled run leaves the model as it was
        raise
    world.finishing()
    return adapters


def _train(world: World, backend: SDBackend, latents: torch.Tensor, rows: range, n: int, settings: LoRASettings,
           rng: SecureRandom | None, adapters: dict[str, LoRALinear], progress: Progress | None) -> None:
    """The DP-SGD steps of :func:`train_dp_lora` on the attached ``adapters``."""
    config = settings.config
    params = [p for adapter in adapters.values() for p in (adapter.down.weight, adapter.up.weight)]
    hooked = GradSampleModule(backend.denoiser, loss_reduction="sum")  # hooks the adapters: all that trains
    expected = max(1, round(settings.sample_rate * settings.public_size))
    optimizer = PrivdiffDPOptimizer(torch.optim.Adam(params, lr=config.lr), rng=rng,
                                    noise_multiplier=settings.noise_multiplier, max_grad_norm=settings.clip_norm,
                                    expected_batch_size=expected)
    size = pass_rows(config, expected, backend.device)
    cond = backend.encode_text([config.prompt])
    steps = len(backend.alphas_cumprod)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_HOOK_WARNING, category=UserWarning)
            for step in range(config.steps):
                optimizer.zero_grad(set_to_none=True)
                batch = world.broadcast(poisson_sample(n, settings.sample_rate, rng).tolist() if world.leader
                                        else None)
                mine = [i for i in batch if i in rows]

                def compute(step: int = step, mine: list[int] = mine) -> None:
                    streams = [keyed_generator(_STREAM, settings.key, (step + 1) * n + i) for i in mine]
                    x0 = latents[[i - rows.start for i in mine]].to(backend.device, torch.float32)
                    t = torch.stack([torch.randint(steps, (), generator=g) for g in streams]) if mine else \
                        torch.empty(0, dtype=torch.long)
                    noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in streams]) if mine else \
                        torch.empty(0, *latents.shape[1:])
                    per_sample_gradients(backend, params, size, x0, t, noise.to(x0.device), cond)

                optimizer.step_across(world, compute)
                if progress is not None:
                    progress(step + 1, config.steps)
    finally:
        optimizer.zero_grad(set_to_none=True)  # drops opacus' per-sample and summed gradients
        optimizer.close()
        hooked.remove_hooks()  # the UNet samples as before; the adapters stay


def lora_settings(config: LoRAConfig, params: DPParams, report: PrivacyReport, rng: SecureRandom) -> LoRASettings:
    """The release's public settings and a fresh key for its training streams (drawn from ``rng``)."""
    return LoRASettings(config, params.sample_rate, params.clip_norm, report.noise_multiplier, report.public_size,
                        rng.random_bytes(32))


def latents_of(backend: SDBackend, images: torch.Tensor, rows: range, key: bytes) -> torch.Tensor:
    """The VAE latents of records ``rows`` (``images``, in order), each sampled from its own keyed stream."""
    return encode_each(backend, images, [keyed_generator(_VAE_STREAM, key, i) for i in rows])


def plan_dp_lora(params: DPParams, dataset_size: int, config: LoRAConfig, *, seed: int | None = None,
                 dataset_label: str | None = None) -> PrivacyReport:
    """The report of a DP-LoRA release (no model needed): ``config.steps`` compositions of the subsampled
    Gaussian, N public by convention as for every DP-SGD release. Only ``bound="clip"``. The adapter settings are
    checked here, before any charge."""
    check_settings(config.rank, config.alpha, config.targets)
    if params.bound == "normalize":
        raise PrivdiffError("bound 'normalize' is not available for DP-LoRA: DP-SGD clips per-sample gradients; "
                            "use bound 'clip'")
    center = "none: per-sample gradients are clipped (the adapters start from the base model)"
    return plan_release(MECHANISM, params, dataset_size, config.steps, center=center, dataset_label=dataset_label,
                        private=seed is None, n_public_by_convention=True)


def run_dp_lora(backend: SDBackend, images: torch.Tensor, params: DPParams, config: LoRAConfig | None = None, *,
                seed: int | None = None, dataset_label: str | None = None, progress: Progress | None = None,
                report: PrivacyReport | None = None) -> tuple[dict[str, LoRALinear], PrivacyReport]:
    """Train DP-LoRA adapters on the n ``images`` [n, 3, H, W] in 0..1; returns them (attached to the UNet) and
    the report.

    ``seed`` makes the run reproducible and marks the release NOT private; ``report``: the release's report from
    ``plan_dp_lora`` when it was planned (and charged) before the model loaded.
    """
    config = config or LoRAConfig()
    report = report or plan_dp_lora(params, len(images), config, seed=seed, dataset_label=dataset_label)
    rng = SecureRandom(seed)
    settings = lora_settings(config, params, report, rng)
    n = len(images)
    latents = latents_of(backend, images, range(n), settings.key)
    return train_dp_lora(World(), backend, latents, range(n), n, settings, rng, progress), report
