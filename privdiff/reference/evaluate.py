"""Sample the small reference model with an embedding or toward a style target, and score the samples."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from privdiff.embeddings.textual_inversion import PLACEHOLDER
from privdiff.guidance.sampler import GuidanceConfig, sample
from privdiff.models.diffusers_backend import DiffusersBackend
from privdiff.models.image_encoders import ImageEncoder
from privdiff.models.small_classifier import AttributeClassifier
from privdiff.reference.score import Score, score
from privdiff.reference.shapes import COLOURS, SHAPES

PROMPT = "a {colour} {shape} in {token} style"
"""The evaluation prompt; ``token`` is the embedding's placeholder (or a word)."""


def prompt_pairs(count: int, seed: int) -> list[tuple[str, str]]:
    """``count`` (shape, colour) pairs, cycling through every combination in a seeded order."""
    pairs = [(s, c) for s in SHAPES for c in COLOURS]
    order = np.random.default_rng([seed, 3]).permutation(len(pairs))
    return [pairs[order[i % len(pairs)]] for i in range(count)]


@torch.no_grad()
def generate(pipe: StableDiffusionPipeline, prompts: list[str], vectors: dict[str, torch.Tensor] | None = None,
             *, steps: int = 25, cfg: float = 4.0, seed: int = 0) -> torch.Tensor:
    """Images [B,3,H,W] in 0..1 for ``prompts`` (DDIM, classifier-free guidance against "").

    With ``vectors`` {encoder: [n, dim]}, each prompt holds ``PLACEHOLDER`` once and the vectors take its
    place, exactly as a loaded embedding file would; without, the prompts are plain text.
    """
    n = len(prompts)
    if vectors is None:
        cond = pipe.encode_prompt(prompts, pipe.device, 1, False)[0]
    else:
        batch = {k: v.to(pipe.device).unsqueeze(0).expand(n, -1, -1) for k, v in vectors.items()}
        cond = DiffusersBackend(pipe).encode_prompts(prompts, PLACEHOLDER, batch)["encoder_hidden_states"]
    uncond = pipe.encode_prompt([""] * n, pipe.device, 1, False)[0]
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=steps, guidance_scale=cfg,
               generator=torch.Generator().manual_seed(seed), output_type="pt")
    return out.images.float()


def evaluate(pipe: StableDiffusionPipeline, classifier: AttributeClassifier, style: str,
             vectors: dict[str, torch.Tensor] | None = None, word: str | None = None,
             *, count: int = 40, seed: int = 0) -> Score:
    """Score ``count`` samples of "a {colour} {shape} in X style" for ``style``, X the embedding or ``word``."""
    if (vectors is None) == (word is None):
        raise ValueError("give either vectors or a word")
    pairs = prompt_pairs(count, seed)
    token = PLACEHOLDER if vectors is not None else word
    prompts = [PROMPT.format(colour=c, shape=s, token=token) for s, c in pairs]
    return score(classifier, generate(pipe, prompts, vectors, seed=seed), style, pairs)


def generate_guided(pipe: StableDiffusionPipeline, prompts: list[str], encoder: ImageEncoder, target: torch.Tensor,
                    config: GuidanceConfig, *, seed: int = 0) -> torch.Tensor:
    """Images [B,3,H,W] in 0..1 for plain ``prompts``, sampled with universal guidance toward ``target``."""
    backend = DiffusersBackend(pipe)
    backend.freeze()
    cond, uncond = backend.encode_text(prompts), backend.encode_text([""] * len(prompts))
    generator = torch.Generator().manual_seed(seed)
    side = backend.resolution // pipe.vae_scale_factor
    latents = torch.randn(len(prompts), pipe.unet.config.in_channels, side, side, generator=generator)
    z = sample(backend, cond, uncond, latents, config, generator, encoder, target)
    with torch.no_grad():
        return backend.decode_latents(z).float()


def evaluate_guided(pipe: StableDiffusionPipeline, classifier: AttributeClassifier, style: str,
                    encoder: ImageEncoder, target: torch.Tensor, config: GuidanceConfig,
                    *, count: int = 40, seed: int = 0) -> Score:
    """Score ``count`` guided samples of "a {colour} {shape}" (no style named) for ``style``."""
    pairs = prompt_pairs(count, seed)
    prompts = [f"a {c} {s}" for s, c in pairs]
    return score(classifier, generate_guided(pipe, prompts, encoder, target, config, seed=seed), style, pairs)
