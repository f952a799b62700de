"""Sample the small reference model with an embedding or toward a style target, and score the samples.

    python -m privdiff.reference.evaluate [--model FOLDER] [--count 200] [--seed 0]

prints how well the model draws held-out public prompts (``shapes.HELD_OUT``): the fraction of samples whose
texture, shape colour, shape and background colour the style classifier reads as prompted, next to the same
fractions for rendered and VAE-reconstructed images of those prompts (the classifier's own ceiling).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from privdiff.embeddings.textual_inversion import PLACEHOLDER
from privdiff.errors import PrivdiffError
from privdiff.guidance.sampler import GuidanceConfig, sample
from privdiff.models.diffusers_backend import DiffusersBackend
from privdiff.models.image_encoders import ImageEncoder
from privdiff.models.small import load_small
from privdiff.models.small_classifier import AttributeClassifier, load_classifier
from privdiff.models.small_spec import WEIGHTS
from privdiff.reference.score import Score, score
from privdiff.reference.shapes import COLOURS, HELD_OUT, SHAPES, Spec, render

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
    return evaluate_samples(pipe, classifier, style, vectors, word, count=count, seed=seed)[0]


def evaluate_samples(pipe: StableDiffusionPipeline, classifier: AttributeClassifier, style: str,
                     vectors: dict[str, torch.Tensor] | None = None, word: str | None = None,
                     *, count: int = 40, seed: int = 0) -> tuple[Score, torch.Tensor]:
    """``evaluate``'s score and the samples it scored, whose (shape, colour) are ``prompt_pairs(count, seed)``."""
    if (vectors is None) == (word is None):
        raise ValueError("give either vectors or a word")
    pairs = prompt_pairs(count, seed)
    token = PLACEHOLDER if vectors is not None else word
    prompts = [PROMPT.format(colour=c, shape=s, token=token) for s, c in pairs]
    images = generate(pipe, prompts, vectors, seed=seed)
    return score(classifier, images, style, pairs), images


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
    return evaluate_guided_samples(pipe, classifier, style, encoder, target, config, count=count, seed=seed)[0]


def evaluate_guided_samples(pipe: StableDiffusionPipeline, classifier: AttributeClassifier, style: str,
                            encoder: ImageEncoder, target: torch.Tensor, config: GuidanceConfig,
                            *, count: int = 40, seed: int = 0) -> tuple[Score, torch.Tensor]:
    """``evaluate_guided``'s score and the samples it scored (their prompts as ``evaluate_samples``')."""
    pairs = prompt_pairs(count, seed)
    prompts = [f"a {c} {s}" for s, c in pairs]
    images = generate_guided(pipe, prompts, encoder, target, config, seed=seed)
    return score(classifier, images, style, pairs), images


ATTRIBUTES = {"texture": "texture", "shape colour": "colour", "shape": "shape", "background colour": "background"}
"""The four accuracies of the held-out evaluation: report name -> classifier head (and ``Spec`` field)."""


def held_out_specs(count: int) -> list[Spec]:
    """``count`` held-out public combinations, cycling through ``HELD_OUT``."""
    return [HELD_OUT[i % len(HELD_OUT)] for i in range(count)]


def accuracies(classifier: AttributeClassifier, images: torch.Tensor, specs: list[Spec]) -> dict[str, float]:
    """Per attribute, the fraction of ``images`` [B,3,32,32] the classifier reads as ``specs`` says."""
    labels = classifier.labels(images)
    return {name: sum(lab[head] == getattr(spec, head) for lab, spec in zip(labels, specs, strict=True)) / len(specs)
            for name, head in ATTRIBUTES.items()}


def held_out_report(pipe: StableDiffusionPipeline, classifier: AttributeClassifier, *, count: int = 200,
                    seed: int = 0) -> dict[str, dict[str, float]]:
    """Accuracies on ``count`` held-out prompts "a {colour} {shape} in {style} style" for the model's samples
    (DDIM 25 steps, CFG 4, seeded), and for rendered images of the same prompts and their VAE reconstructions."""
    specs = held_out_specs(count)
    rng = np.random.default_rng([seed, 5])
    rendered = torch.from_numpy(np.stack([render(s, rng) for s in specs])).permute(0, 3, 1, 2)
    with torch.no_grad():
        vae = pipe.vae
        roundtrip = torch.cat([(vae.decode(vae.encode(x * 2 - 1).latent_dist.mean).sample + 1) / 2
                               for x in rendered.split(256)]).clamp(0, 1)
    prompts = [f"a {s.colour} {s.shape} in {s.style} style" for s in specs]
    return {"rendered": accuracies(classifier, rendered, specs),
            "VAE round trip": accuracies(classifier, roundtrip, specs),
            "samples": accuracies(classifier, generate(pipe, prompts, seed=seed), specs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m privdiff.reference.evaluate",
                                     description="How well the small reference model draws held-out public prompts.")
    parser.add_argument("--model", type=Path, default=WEIGHTS, help="the model folder (default: the shipped weights)")
    parser.add_argument("--count", type=int, default=200, help="samples (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    try:
        report = held_out_report(load_small(folder=args.model), load_classifier(args.model), count=args.count,
                                 seed=args.seed)
    except PrivdiffError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{args.model}: {args.count} held-out public prompts ({len(HELD_OUT)} combinations), seed {args.seed}")
    print(f"{'':16}" + "".join(f"{name:>19}" for name in ATTRIBUTES))
    for row, values in report.items():
        print(f"{row:16}" + "".join(f"{values[name]:>19.3f}" for name in ATTRIBUTES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
