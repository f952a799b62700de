"""The spectral part of `make demo`: a DP prior over coarse Haar-wavelet tokens (arXiv 2602.23262).

The public prior ships with privdiff (``SPECTRAL_PRIOR``): public procedural images (the reference model's public
styles) trained a spectral tokenizer at 16 px and a small autoregressive prior over its tokens (`privdiff wavelet
tokenizer`, `privdiff wavelet pretrain`; ``python -m privdiff.demo.spectral --public-prior`` rebuilds it, seeded).
The DP release is a DP-SGD fine-tune of that prior on the private "teal stripes" images at ε = 10 (`privdiff
wavelet finetune`, the same generated images as the rest of the demo). Sampling and upsampling are
post-processing and spend no budget. Writes privdiff-demo/spectral-dp-eps10.safetensors (with its privacy report)
and spectral-grid.png: the private images, then samples
with the same seeds in every column from the public and the DP prior (temperature 0.8), coarse (16 px), upsampled
bicubically (x4), and refined by the small reference model (img2img at its 32 px, empty prompt); rows are labelled
with the style score (the fraction of 24 samples, at 32 px, the style classifier reads as teal stripes).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from privdiff.cli.main import main as cli_main
from privdiff.demo.grid import CELL, draw_grid
from privdiff.errors import PrivdiffError
from privdiff.models.small_spec import SPECTRAL_PRIOR
from privdiff.reference.shapes import public_dataset, write_style_folder

STYLE = "teal stripes"
PRIVATE_COUNT, PUBLIC_COUNT = 100, 1000
COARSE, SCALE, SAMPLES, SHOWN = 16, 4, 24, 6
EPSILON, DELTA = "10", "1e-5"
TOKENIZER = ["--size", str(COARSE), "--base", "4", "--codebook-size", "128"]
PRIOR = ["--dim", "64", "--layers", "2", "--heads", "4"]
PRETRAIN = ["--steps", "600", "--batch-size", "32", "--lr", "1e-3"]
FINETUNE = ["--steps", "40", "--batch-size", "32", "--lr", "3e-3", "--clip-norm", "1"]
TEMPERATURE = 0.8
"""Sampling temperature of both priors (post-processing; below 1 gives cleaner textures)."""
REFINE_STRENGTH, REFINE_STEPS = 0.4, 25


def _privdiff(*args: str) -> None:
    """One `privdiff` command, shown on stderr as it would be typed, run in this process."""
    print(f"\n$ privdiff {shlex.join(args)}", file=sys.stderr)
    code = cli_main(list(args))
    if code:
        raise SystemExit(code)


def _write_public(folder: Path) -> Path:
    """PUBLIC_COUNT public images (public styles only: the private style is never among them)."""
    folder.mkdir(parents=True, exist_ok=True)
    images, _, _ = public_dataset(PUBLIC_COUNT, seed=0)
    for i, image in enumerate(images):
        Image.fromarray((image * 255).round().astype(np.uint8), mode="RGB").save(folder / f"{i:04d}.png")
    return folder


def _to_pil(x: torch.Tensor) -> Image.Image:
    array = (x.clamp(0, 1).permute(1, 2, 0) * 255).round().byte().numpy()
    size = array.shape[0]
    resample = Image.Resampling.NEAREST if CELL % size == 0 else Image.Resampling.LANCZOS
    return Image.fromarray(array).resize((CELL, CELL), resample)


def _style_score(classifier, images32: torch.Tensor) -> float:
    """The fraction of images [B,3,32,32] the style classifier reads as STYLE (background colour and texture)."""
    background, texture = STYLE.split()
    labels = classifier.labels(images32)
    return sum(lab["background"] == background and lab["texture"] == texture for lab in labels) / len(labels)


def _bicubic(images: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def train_public_prior(out: Path = SPECTRAL_PRIOR) -> Path:
    """Train the public spectral tokenizer and prior (seeded, public data only) into ``out`` (the prior file holds
    the tokenizer); returns ``out``."""
    with tempfile.TemporaryDirectory(prefix="privdiff-spectral-public-") as tmp:
        public, tokenizer = str(_write_public(Path(tmp) / "public")), str(Path(tmp) / "tokenizer.safetensors")
        _privdiff("wavelet", "tokenizer", "--images", public, "--out", tokenizer, *TOKENIZER)
        _privdiff("wavelet", "pretrain", "--tokenizer", tokenizer, "--images", public, "--out", str(out), *PRIOR,
                  *PRETRAIN, "--force")
    return out


def run_spectral(out: Path, public_prior: Path = SPECTRAL_PRIOR) -> Path:
    """Release and sample a DP fine-tune of ``public_prior``; writes ``out``/spectral-grid.png and returns its
    path."""
    from privdiff.models.diffusers_backend import DiffusersBackend
    from privdiff.models.registry import load_model
    from privdiff.models.small import WEIGHTS
    from privdiff.models.small_classifier import load_classifier
    from privdiff.wavelet.upsample import refine
    from privdiff.wavelet.workflow import sample_prior

    if not public_prior.is_file():
        raise PrivdiffError(f"the public spectral prior is missing: {public_prior}; rebuild it with "
                            "`python -m privdiff.demo.spectral --public-prior`")
    out.mkdir(exist_ok=True)
    dp_prior = out / f"spectral-dp-eps{EPSILON}.safetensors"
    with tempfile.TemporaryDirectory(prefix="privdiff-demo-private-") as private:
        images = write_style_folder(Path(private) / "images", STYLE, PRIVATE_COUNT, seed=0)
        _privdiff("wavelet", "finetune", "--prior", str(public_prior), "--images", str(images), "--out",
                  str(dp_prior), "--epsilon", EPSILON, "--delta", DELTA, *FINETUNE,
                  "--checkpoint-dir", str(Path(private) / "checkpoints"),  # private state stays with the private data
                  "--dataset-label", f"demo: generated '{STYLE}' style", "--force")
        examples = [Image.open(p).convert("RGB").resize((CELL, CELL), Image.Resampling.NEAREST)
                    for p in sorted(images.glob("*.png"))[:SHOWN]]

    classifier = load_classifier(WEIGHTS)
    backend = DiffusersBackend(load_model("small"))
    backend.freeze()
    rows: dict[str, list[tuple[str, list[Image.Image]]]] = {"coarse": [], "bicubic": [], "refined": []}
    for name, prior in (("public prior alone", public_prior), (f"DP prior, ε = {EPSILON}", dp_prior)):
        coarse, _ = sample_prior(prior, SAMPLES, seed=1, temperature=TEMPERATURE)
        refined = refine(backend, coarse, "", size=backend.resolution, strength=REFINE_STRENGTH, steps=REFINE_STEPS,
                         seed=1).clamp(0, 1)
        score = _style_score(classifier, _bicubic(coarse, backend.resolution))
        rows["coarse"].append((f"{name}: coarse {COARSE} px\nstyle {score:.0%} (bicubic to 32 px)",
                               [_to_pil(x) for x in coarse[:SHOWN]]))
        rows["bicubic"].append((f"{name}:\nthe same, bicubic x{SCALE}",
                                [_to_pil(x) for x in _bicubic(coarse[:SHOWN], COARSE * SCALE)]))
        rows["refined"].append((f"{name}: refined (small\nmodel, img2img {REFINE_STRENGTH:g}) · style "
                                f"{_style_score(classifier, refined):.0%}", [_to_pil(x) for x in refined[:SHOWN]]))
    grid_rows = [("private images (never released)", examples), *rows["coarse"], *rows["bicubic"], *rows["refined"]]
    grid = out / "spectral-grid.png"
    draw_grid(grid_rows, [f"sample {j + 1}" for j in range(SHOWN)]).save(grid)
    print(f"\nwrote {dp_prior} (its privacy report is in the file: privdiff wavelet inspect {dp_prior}), fine-tuned "
          f"from {public_prior}, and {grid}", file=sys.stderr)
    for label, _ in grid_rows[1:]:
        print("  " + label.replace("\n", " "), file=sys.stderr)
    return grid


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m privdiff.demo.spectral", description=__doc__.split("\n")[0])
    parser.add_argument("--public-prior", action="store_true",
                        help=f"rebuild the shipped public prior ({SPECTRAL_PRIOR.name}) instead of running the demo")
    if parser.parse_args().public_prior:
        print(f"wrote {train_public_prior()}", file=sys.stderr)
    else:
        run_spectral(Path("privdiff-demo"))
