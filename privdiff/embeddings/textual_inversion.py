"""Batched textual inversion: one embedding per image, all trained together by one optimiser.

Each image owns a random stream (template choice, timestep, noise) drawn from its own generator, and the loss
is a sum of per-image losses, so row ``i`` receives its own image's gradients and Adam's updates, which depend
on the other rows only through the kernels' choice of algorithm for the batch's shape. Every chunk therefore has
exactly ``batch_size`` rows, the last padded with public dummies (``privdiff.io.batching``): an image's embedding is
the same, bit for bit, in any chunk and position (checked on CPU by the tests). Trained alone (a batch of one)
it agrees only to rounding (~1e-6 relative in float32; to the last bit in float64 in the tests).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from privdiff.embeddings.templates import TEMPLATES
from privdiff.errors import PrivdiffError
from privdiff.io.batching import dummy_generator, padded
from privdiff.models.protocol import SDBackend
from privdiff.models.training import keyed_generator, noise_prediction_loss
from privdiff.privacy.randomness import SecureRandom
from privdiff.progress import Progress

PLACEHOLDER = "<privdiff-token>"


@dataclass(frozen=True)
class TIConfig:
    """Hyper-parameters of per-image textual inversion."""

    n_vectors: int = 1
    init_word: str = "style"
    steps: int = 200
    lr: float = 5e-3
    batch_size: int = 8
    templates: str = "style"

    def __post_init__(self) -> None:
        for flag, value, ok in (
            ("vectors", self.n_vectors, self.n_vectors >= 1),
            ("steps", self.steps, self.steps >= 1),
            ("learning rate", self.lr, self.lr > 0 and math.isfinite(self.lr)),
            ("batch size", self.batch_size, self.batch_size >= 1),
            ("templates", self.templates, self.templates in TEMPLATES),
        ):
            if not ok:
                raise PrivdiffError(f"invalid {flag} {value!r}")


def check_config(backend: SDBackend, config: TIConfig) -> None:
    """Refuse a config the model cannot train, before any image is read.

    Every training prompt is BOS, a template's words around ``n_vectors`` placeholder slots, and EOS;
    it must fit in each text encoder's context (``model_max_length``: 77 tokens for SD's CLIP encoders).
    Backends that expose no diffusers tokenizers are not checked here.
    """
    words = [template.format(PLACEHOLDER).split(PLACEHOLDER) for template in TEMPLATES[config.templates]]
    for tokenizer in _tokenizers(backend):
        context = int(tokenizer.model_max_length)
        longest = max(sum(len(tokenizer(p, add_special_tokens=False).input_ids) for p in parts if p.strip())
                      for parts in words)
        room = context - 2 - longest
        if config.n_vectors > room:
            raise PrivdiffError(
                f"vectors {config.n_vectors} is too many for this model: its text encoder reads {context} "
                f"tokens, and BOS, EOS and the longest {config.templates!r} prompt template ({longest} tokens) "
                f"leave room for at most {room} vectors"
            )


def _tokenizers(backend: SDBackend) -> list:
    """The tokenizers of a backend over a diffusers pipeline (SDXL has two); [] for other backends."""
    pipe = getattr(backend, "pipe", None)
    return [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if t is not None]


def training_generator(rng: SecureRandom, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator seeded with 64 bits of ``rng``'s stream, for training randomness (templates, timesteps,
    diffusion noise, VAE sampling) that the privacy guarantee does not rely on: torch's CPU generator keeps 32
    bits of its seed, so it is never used for Poisson sampling or DP noise (those draw from ``rng`` itself)."""
    return torch.Generator(device=device).manual_seed(int.from_bytes(rng.random_bytes(8), "little"))


def image_generator(key: bytes, index: int, device: str | torch.device = "cpu") -> torch.Generator:
    """The training stream of record ``index`` of a release (VAE sampling, templates, timesteps, noise), keyed by
    ``key`` from the release's CSPRNG (``keyed_generator``): a release across ranks trains every image as one
    process does."""
    return keyed_generator(b"privdiff per-image training stream\0", key, index, device)


def initial_vectors(backend: SDBackend, config: TIConfig) -> dict[str, torch.Tensor]:
    """The public starting point: the init word's token vectors {encoder: [n_vectors, dim]}, CPU float32.

    The config is checked against the model first (:func:`check_config`).
    """
    check_config(backend, config)
    vectors = backend.token_vectors(config.init_word, config.n_vectors)
    return {k: v.detach().float().cpu() for k, v in vectors.items()}


def example_draws(backend: SDBackend, latent: torch.Tensor, gen: torch.Generator, n_templates: int):
    """One step's random draws for one image: template index, timestep and noise (``latent``'s shape)."""
    template = int(torch.randint(n_templates, (), generator=gen))
    t = torch.randint(len(backend.alphas_cumprod), (), generator=gen)
    noise = torch.randn(latent.shape, generator=gen, dtype=latent.dtype)
    return template, t, noise


def train_embeddings(
    backend: SDBackend,
    latents: torch.Tensor,
    init: dict[str, torch.Tensor],
    config: TIConfig,
    generators: list[torch.Generator],
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """Train one embedding per latent; returns {encoder: [m, n_vectors, dim]} on the CPU.

    ``latents`` are the VAE latents of the m images, ``init`` the public initial vectors
    {encoder: [n_vectors, dim]}, and ``generators[i]`` the random stream of image ``i``.
    Images are trained ``config.batch_size`` at a time, the last chunk padded to that size with dummies.
    """
    if len(generators) != len(latents):
        raise ValueError("one generator per image is required")
    m = len(latents)
    starts = range(0, m, config.batch_size)
    total, done = len(starts) * config.steps, 0

    def on_step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    out = {enc: torch.empty(m, *v.shape) for enc, v in init.items()}
    for s in starts:
        e = min(s + config.batch_size, m)
        dummies = [dummy_generator() for _ in range(config.batch_size - (e - s))]
        chunk = padded(latents[s:e], config.batch_size)
        trained = _train_chunk(backend, chunk, init, config, generators[s:e] + dummies, on_step)
        for enc, v in trained.items():
            out[enc][s:e] = v[:e - s]
    return out


def train_shared_embedding(
    backend: SDBackend,
    latents: torch.Tensor,
    init: dict[str, torch.Tensor],
    config: TIConfig,
    generator: torch.Generator,
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """Ordinary, non-private textual inversion: one embedding {encoder: [n_vectors, dim]} for all latents.

    Each step draws ``config.batch_size`` latents uniformly (with replacement) from ``generator``, which
    also draws templates, timesteps and noise. This is the reference DPAgg-TI and DP-SGD are compared with;
    its result carries no privacy guarantee.
    """
    templates = TEMPLATES[config.templates]
    device, dtype = backend.device, backend.dtype
    params = {enc: v.detach().to(device, torch.float32).clone().requires_grad_(True) for enc, v in init.items()}
    optimizer = torch.optim.Adam(list(params.values()), lr=config.lr)
    x_all = latents.to(device, torch.float32)
    for step in range(config.steps):
        idx = torch.randint(len(latents), (config.batch_size,), generator=generator)
        draws = [example_draws(backend, latents[i], generator, len(templates)) for i in idx.tolist()]
        prompts = [templates[d[0]].format(PLACEHOLDER) for d in draws]
        t = torch.stack([d[1] for d in draws])
        noise = torch.stack([d[2] for d in draws])
        vectors = {k: p.to(dtype).unsqueeze(0).expand(len(idx), -1, -1) for k, p in params.items()}
        loss = diffusion_loss(backend, x_all[idx.to(device)], t, noise, prompts, vectors).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress(step + 1, config.steps)
    return {enc: p.detach().cpu() for enc, p in params.items()}


def _train_chunk(
    backend: SDBackend,
    latents: torch.Tensor,
    init: dict[str, torch.Tensor],
    config: TIConfig,
    generators: list[torch.Generator],
    on_step: Callable[[], None],
) -> dict[str, torch.Tensor]:
    """Train the rows of one batch together: parameter [m, n_vectors, dim] per encoder."""
    templates = TEMPLATES[config.templates]
    device, dtype = backend.device, backend.dtype
    m = len(latents)
    params = {
        enc: v.detach().to(device, torch.float32).unsqueeze(0).repeat(m, 1, 1).requires_grad_(True)
        for enc, v in init.items()
    }
    optimizer = torch.optim.Adam(list(params.values()), lr=config.lr)
    x0 = latents.to(device, torch.float32)
    for _ in range(config.steps):
        draws = [example_draws(backend, x, g, len(templates)) for x, g in zip(latents, generators, strict=True)]
        prompts = [templates[d[0]].format(PLACEHOLDER) for d in draws]
        t = torch.stack([d[1] for d in draws])
        noise = torch.stack([d[2] for d in draws])
        vectors = {k: p.to(dtype) for k, p in params.items()}
        # A sum of per-image losses: each row's gradient is its own image's gradient.
        loss = diffusion_loss(backend, x0, t, noise, prompts, vectors).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        on_step()
    return {enc: p.detach().cpu() for enc, p in params.items()}


def diffusion_loss(
    backend: SDBackend,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    prompts: list[str],
    vectors: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Per-example noise-prediction MSE [B] of the frozen model, conditioned on injected vectors.

    ``x0`` are clean latents [B, ...], ``t`` integer timesteps [B], ``noise`` the forward-process
    noise; the target follows the model's prediction type (epsilon or v).
    """
    return noise_prediction_loss(backend, x0, t, noise, backend.encode_prompts(prompts, PLACEHOLDER, vectors))
