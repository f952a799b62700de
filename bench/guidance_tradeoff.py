"""DP Universal Guidance's trade-off on the small reference model: style gained against prompt adherence kept.

A DP style target (ε = 1, δ = 1e-5) is released from N private images of a held-out style with the small
model's public image encoder, several times (new images and new DP noise each); plain prompts ("a {colour}
{shape}", no style word) are then sampled with guidance toward it at each guidance weight w and recurrence k,
with the same starting noise for every (w, k). Each cell is the mean ± std over the targets of the style score
(the fraction of samples the style classifier reads as the private style) and the prompt adherence (shape and
colour as asked). w = 0 is plain sampling. The last line is the demo's setting (w, k from
``privdiff.demo.styles.GUIDANCE``): its style score, and its adherence against w = 0's.

    python bench/guidance_tradeoff.py [--images 100] [--targets 3] [--samples 24] [--weights 0,2,4,6,10] [--cfg 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace

import torch

from privdiff.demo.styles import GUIDANCE, STYLE
from privdiff.guidance.target import make_target, target_params
from privdiff.models.image_encoders import load_small_encoder
from privdiff.models.small import WEIGHTS, load_small
from privdiff.models.small_classifier import load_classifier
from privdiff.reference.evaluate import evaluate_guided
from privdiff.reference.shapes import style_images


def _cell(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {spread:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=100, help="private images per target (default 100)")
    parser.add_argument("--targets", type=int, default=3, help="DP targets released (default 3)")
    parser.add_argument("--samples", type=int, default=24, help="samples scored per cell and target (default 24)")
    parser.add_argument("--weights", default="0,2,4,6,10", help="guidance weights w (default 0,2,4,6,10)")
    parser.add_argument("--recurrences", default="1,2", help="recurrences k (default 1,2)")
    parser.add_argument("--cfg", type=float, default=GUIDANCE.cfg, help=f"CFG scale (default {GUIDANCE.cfg:g})")
    args = parser.parse_args(argv)
    weights = [float(w) for w in args.weights.split(",")]
    recurrences = [int(k) for k in args.recurrences.split(",")]
    pipe, classifier, encoder = load_small(), load_classifier(WEIGHTS), load_small_encoder()
    start = time.perf_counter()
    targets = []
    for seed in range(args.targets):
        pixels, _ = style_images(STYLE, args.images, seed=100 + seed)
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2)
        targets.append(make_target(encoder, images, target_params(1.0, 1e-5)).vector)  # CSPRNG noise
    cells = {}
    for w in weights:
        for k in ([1] if w == 0 else recurrences):
            config = replace(GUIDANCE, weight=w, recurrence=k, cfg=args.cfg)
            scores = [evaluate_guided(pipe, classifier, STYLE, encoder, t, config, count=args.samples)
                      for t in targets]
            cells[(w, k)] = scores
            print(f"w {w:g} k {k}: style {_cell([s.style for s in scores])}, adherence "
                  f"{_cell([s.adherence for s in scores])}", file=sys.stderr, flush=True)
    print(f"\nguidance toward a DP style target (eps = 1): style '{STYLE}', N = {args.images}, {args.targets} "
          f"targets, {args.samples} samples each, DDIM {GUIDANCE.steps} steps, CFG {args.cfg:g}, "
          f"{time.perf_counter() - start:.0f} s")
    print(f"{'w':>5} {'k':>3}  {'style score':>12}  {'texture':>12}  {'adherence':>12}")
    for (w, k), scores in cells.items():
        print(f"{w:>5g} {k:>3}  {_cell([s.style for s in scores]):>12}  {_cell([s.texture for s in scores]):>12}  "
              f"{_cell([s.adherence for s in scores]):>12}")
    plain = statistics.mean(s.adherence for s in cells[(0.0, 1)]) if (0.0, 1) in cells else float("nan")
    demo = cells.get((GUIDANCE.weight, GUIDANCE.recurrence))
    if demo is None:
        print(f"demo setting w {GUIDANCE.weight:g} k {GUIDANCE.recurrence}: not run")
    else:
        print(f"demo setting w {GUIDANCE.weight:g} k {GUIDANCE.recurrence}: style "
              f"{statistics.mean(s.style for s in demo):.2f}, adherence "
              f"{statistics.mean(s.adherence for s in demo):.2f} (w = 0: {plain:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
