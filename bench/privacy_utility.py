"""Privacy against utility on the small reference model (arXiv 2411.14639's central comparison, in miniature).

For N private images of a held-out style and several seeds (each seed: new images, new training
randomness, new DP noise), train and score:
  - the init word alone (no private information),
  - non-private textual inversion (one embedding trained on all images),
  - DPAgg-TI at each ε (ε = ∞: the noise-free mean of the bounded per-image offsets),
  - DP-SGD TI at each finite ε (opacus, the project's DP optimiser),
  - with ``--lora``, DP-LoRA at each finite ε (DP-SGD on the UNet's attention adapters, trained with an empty
    prompt) and, for comparison, the model without adaptation; both sampled with plain prompts "a {colour}
    {shape}", since a LoRA has no token.
Each embedding is scored on samples of "a {colour} {shape} in <token> style" by the style classifier:
the fraction in the private style, and prompt adherence (shape and colour as asked).

DPAgg-TI runs with sample rate q = 1, where every image is sampled: its per-image embeddings are then
the same for every ε, so they are trained once per seed and each ε's release is the library's
aggregate of them (`aggregate_embeddings`, σ calibrated by `plan_dpagg_ti`, fresh CSPRNG noise).
The last line is the ratio of DPAgg-TI's style score at ε = 1 to non-private TI's.

    python bench/privacy_utility.py [--images 200] [--seeds 2] [--samples 40] [--style "teal stripes"]
        [--epsilons inf,10,3,1] [--per-image-steps 40] [--lora]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import replace

import torch

from privdiff.embeddings.dpagg import aggregate_embeddings, encode_in_batches, plan_dpagg_ti
from privdiff.embeddings.dpsgd_ti import run_dpsgd_ti
from privdiff.embeddings.textual_inversion import (
    TIConfig,
    initial_vectors,
    train_embeddings,
    train_shared_embedding,
)
from privdiff.lora.adapters import detach
from privdiff.lora.training import LoRAConfig, run_dp_lora
from privdiff.models.diffusers_backend import DiffusersBackend
from privdiff.models.small import WEIGHTS, load_small
from privdiff.models.small_classifier import load_classifier
from privdiff.privacy.mechanism import bound_vectors
from privdiff.privacy.randomness import SecureRandom
from privdiff.reference import score as scoring
from privdiff.reference.evaluate import evaluate, generate, prompt_pairs
from privdiff.reference.score import Score
from privdiff.reference.shapes import PRIVATE_STYLES, style_images
from privdiff.release.dp_params import DPParams

STYLE = "teal stripes"
"""The private style of the README's table (``--style`` picks another of ``PRIVATE_STYLES``)."""
DELTA = 1e-5
PER_IMAGE = TIConfig(steps=40, lr=2e-2, batch_size=50)
"""DPAgg-TI's per-image training (`make demo` trains 25 steps at 0.015, with C = 2.5, to fit its time)."""
SHARED = TIConfig(steps=150, lr=2e-2, batch_size=16)
"""Non-private TI: one embedding, 150 steps of 16 images."""
DPAGG_CLIP = 4.0
"""About the per-image offsets' norm for these settings, measured on a public style (gray waves)."""
DPSGD = TIConfig(steps=60, lr=2e-2, batch_size=64)
DPSGD_RATE, DPSGD_CLIP = 0.16, 0.2
"""Expected batch 0.16·N; C about the median per-sample gradient norm on a public style."""
LORA = LoRAConfig(rank=4, alpha=4.0, steps=100, lr=1e-2, batch_size=32)
LORA_RATE, LORA_CLIP = 0.16, 1.0
"""DP-LoRA: expected batch 0.16·N, as DP-SGD TI."""


def _offsets_mean(per_image: dict[str, torch.Tensor], init: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ε = ∞: the mean of the bounded per-image offsets, without noise."""
    keys = sorted(init)
    flat = torch.cat([(per_image[k] - init[k]).flatten(1) for k in keys], dim=1)
    mean = bound_vectors(flat, DPAGG_CLIP, "clip").mean(0).float()
    parts = mean.split([init[k].numel() for k in keys])
    return {k: init[k] + p.view_as(init[k]) for k, p in zip(keys, parts, strict=True)}


def _plain_prompts(pipe, classifier, style: str, samples: int, seed: int) -> Score:
    """Samples of "a {colour} {shape}" (no style named) with the pipeline as it is, scored for ``style``."""
    pairs = prompt_pairs(samples, seed)
    return scoring.score(classifier, generate(pipe, [f"a {c} {s}" for s, c in pairs], seed=seed), style, pairs)


def run_seed(pipe, classifier, n: int, seed: int, epsilons: list[float], samples: int,
             results: dict[tuple[str, float], list[Score]], timings: dict[str, float], style: str = STYLE,
             lora: bool = False, dpagg_config: TIConfig = PER_IMAGE) -> None:
    """Train and score every method for one seed; appends to ``results[(method, ε)]``."""
    backend = DiffusersBackend(pipe)
    backend.freeze()
    pixels, _ = style_images(style, n, seed=100 + seed)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    gen = torch.Generator().manual_seed(seed)
    latents = encode_in_batches(backend, images, 64, gen)
    init = initial_vectors(backend, dpagg_config)

    def score(method: str, eps: float, vectors=None, word=None) -> None:
        results.setdefault((method, eps), []).append(
            evaluate(pipe, classifier, style, vectors=vectors, word=word, count=samples, seed=seed))

    def timed(name: str, fn):
        start = time.perf_counter()
        out = fn()
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
        return out

    score("init word alone", math.inf, word=dpagg_config.init_word)
    shared = timed("TI", lambda: train_shared_embedding(backend, latents, init, SHARED, gen))
    score("TI (non-private)", math.inf, vectors=shared)
    streams = [torch.Generator().manual_seed(seed * 100_003 + i) for i in range(n)]
    per_image = timed("DPAgg-TI", lambda: train_embeddings(backend, latents, init, dpagg_config, streams))
    norms = torch.cat([(per_image[k] - init[k]).flatten(1) for k in sorted(init)], 1).norm(dim=1)
    print(f"  seed {seed}: per-image offset norms median {norms.median():.3f} (clip {DPAGG_CLIP})", file=sys.stderr)
    for eps in epsilons:
        if math.isinf(eps):
            score("DPAgg-TI", eps, vectors=_offsets_mean(per_image, init))
            continue
        params = DPParams(epsilon=eps, delta=DELTA, sample_rate=1.0, clip_norm=DPAGG_CLIP, public_size=n)
        sigma = plan_dpagg_ti(params, n, dpagg_config).noise_multiplier
        released = aggregate_embeddings(per_image, init, divisor=n, clip_norm=DPAGG_CLIP, noise_multiplier=sigma,
                                        rng=SecureRandom())
        score("DPAgg-TI", eps, vectors=released)
        params = DPParams(epsilon=eps, delta=DELTA, sample_rate=DPSGD_RATE, clip_norm=DPSGD_CLIP, public_size=n)
        result = timed("DP-SGD TI", lambda p=params: run_dpsgd_ti(backend, images, p, DPSGD))
        score("DP-SGD TI", eps, vectors=result.embedding.vectors)
    if not lora:
        return
    results.setdefault(("plain prompt", math.inf), []).append(_plain_prompts(pipe, classifier, style, samples, seed))
    for eps in [e for e in epsilons if not math.isinf(e)]:
        params = DPParams(epsilon=eps, delta=DELTA, sample_rate=LORA_RATE, clip_norm=LORA_CLIP)
        adapters, _ = timed("DP-LoRA", lambda p=params: run_dp_lora(backend, images, p, LORA))
        try:
            results.setdefault(("DP-LoRA", eps), []).append(_plain_prompts(pipe, classifier, style, samples, seed))
        finally:
            detach(backend.denoiser, adapters)


def _cell(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):5.2f} ± {spread:4.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200, help="private images per seed (default 200)")
    parser.add_argument("--seeds", type=int, default=2, help="independent repetitions (default 2)")
    parser.add_argument("--samples", type=int, default=40, help="samples scored per embedding (default 40)")
    parser.add_argument("--epsilons", default="inf,10,3,1", help="comma-separated (default inf,10,3,1)")
    parser.add_argument("--lora", action="store_true", help="add DP-LoRA rows (and plain prompts without one)")
    parser.add_argument("--style", default=STYLE, choices=PRIVATE_STYLES, help=f"private style (default {STYLE})")
    parser.add_argument("--per-image-steps", type=int, default=PER_IMAGE.steps,
                        help=f"DPAgg-TI's per-image TI steps (default {PER_IMAGE.steps})")
    args = parser.parse_args(argv)
    dpagg_config = replace(PER_IMAGE, steps=args.per_image_steps)
    epsilons = [float(e) for e in args.epsilons.split(",")]
    pipe, classifier = load_small(), load_classifier(WEIGHTS)
    results: dict[tuple[str, float], list[Score]] = {}
    timings: dict[str, float] = {}
    start = time.perf_counter()
    for seed in range(args.seeds):
        run_seed(pipe, classifier, args.images, seed, epsilons, args.samples, results, timings, args.style,
                 args.lora, dpagg_config)
    print(f"\nprivacy vs utility: style '{args.style}', N = {args.images}, {args.seeds} seeds, {args.samples} samples "
          f"each, {dpagg_config.steps} per-image steps, delta = {DELTA}, {time.perf_counter() - start:.0f} s "
          f"(training: {', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})")
    fields = ("style", "texture", "background", "adherence")
    print(f"{'method':<18} {'epsilon':>7}  " + "  ".join(f"{f:>11}" for f in fields))
    for (method, eps), scores in results.items():
        cells = [_cell([getattr(s, field) for s in scores]) for field in fields]
        print(f"{method:<18} {eps:>7g}  " + "  ".join(cells))
    dpagg = statistics.mean(s.style for s in results[("DPAgg-TI", 1.0)]) if ("DPAgg-TI", 1.0) in results else None
    ti = statistics.mean(s.style for s in results[("TI (non-private)", math.inf)])
    if dpagg is None:
        print("ratio DPAgg-TI(eps=1) / TI(non-private) style score: n/a (eps 1 not run)")
    else:
        print(f"ratio DPAgg-TI(eps=1) / TI(non-private) style score: {dpagg / ti if ti else math.nan:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
