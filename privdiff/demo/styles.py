"""`make demo`: learn a private style on the small reference model, with and without differential privacy.

The private images are procedural shapes in the style "teal stripes", a combination the reference
model never saw in its public training data and was never told the name of. The demo releases
three DP embeddings through the `privdiff` command: DPAgg-TI at ε = 3 and ε = 1 (`privdiff aggregate`, both
from one set of per-image embeddings, trained once and kept in a temporary folder that is deleted at the end)
and DP-SGD TI at ε = 1 (`privdiff ti-aggregate --method dpsgd`). It trains a non-private textual inversion
in memory for comparison (never written: it is not private), releases a DP style target at ε = 1
(`privdiff guidance target`, with the small model's public image encoder) and samples plain prompts with
universal guidance toward it. It writes under ./privdiff-demo/: the embedding and target files with their
privacy reports, and grid.png, sampled with the same seeds in every row (the embeddings through diffusers' own
``load_textual_inversion``), each row labelled with its style score (the fraction of 24 samples the style
classifier reads as the private style) and prompt adherence (shape and colour as asked), and showing the first
six of those 24 samples. Then the spectral
demo (``privdiff.demo.spectral``) releases a DP spectral prior (ε = 10) on the same private images and writes
spectral-grid.png.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from privdiff.cli.main import main as cli_main
from privdiff.demo.grid import CELL, draw_grid
from privdiff.demo.spectral import run_spectral
from privdiff.embeddings.dpagg import encode_in_batches, train_sampled
from privdiff.embeddings.files import Embedding, load_embedding, save_embedding
from privdiff.embeddings.textual_inversion import TIConfig, initial_vectors, train_shared_embedding
from privdiff.guidance.sampler import GuidanceConfig
from privdiff.guidance.target import check_encoder, load_target
from privdiff.io.images import load_image_folder
from privdiff.models.diffusers_backend import DiffusersBackend
from privdiff.models.image_encoders import load_small_encoder
from privdiff.models.small import WEIGHTS, load_small
from privdiff.models.small_classifier import load_classifier
from privdiff.privacy.randomness import SecureRandom
from privdiff.privacy.report import PrivacyReport
from privdiff.progress import tqdm_progress
from privdiff.reference.evaluate import evaluate_guided_samples, evaluate_samples, prompt_pairs
from privdiff.reference.score import Score
from privdiff.reference.shapes import write_style_folder

OUT = Path("privdiff-demo")
STYLE = "teal stripes"
COUNT = 100
DELTA = "1e-5"
TI = TIConfig(steps=25, lr=1.5e-2, batch_size=50)
"""Per-image training for DPAgg-TI: offsets of norm about 2.3, so C = 2.5 clips few and adds little noise."""
DPAGG_CLIP = "2.5"
SHARED = TIConfig(steps=60, lr=2e-2, batch_size=16)
"""The non-private TI (one embedding on all images); DP-SGD TI trains with its learning rate too."""
SAMPLES = 24
"""Samples scored per grid row; the grid shows the first COLUMNS of them."""
COLUMNS = 6
GUIDANCE = GuidanceConfig(steps=25, cfg=5.0, weight=6.0, recurrence=2)
"""Universal guidance toward the DP style target (the small model's public encoder stands in for CLIP)."""
DPAGG = (("dpagg-eps3", "3", "DPAgg-TI, ε = 3"), ("dpagg-eps1", "1", "DPAgg-TI, ε = 1"))
DPSGD = ("dpsgd-eps1", "1", "DP-SGD TI, ε = 1")


def _privdiff(args: list[str]) -> None:
    """One `privdiff` command, run in this process; the options every release of the demo shares are added."""
    code = cli_main([*args, "--delta", DELTA, "--force", "--dataset-label", f"demo: generated '{STYLE}' style",
                     "--public-size", str(COUNT)])  # generated data: its size is public, so the guarantee is add-remove
    if code:
        raise SystemExit(code)


def _with_sidecar(out: Path) -> Path:
    PrivacyReport.from_metadata(load_embedding(out).metadata).write_sidecar(out, force=True)
    return out


def _per_image(backend: DiffusersBackend, images: torch.Tensor, folder: Path) -> tuple[Path, Path]:
    """DPAgg-TI's first stage, run once for both its releases: one embedding per private image, written to
    ``folder``/per-image (private intermediates, in the private temporary folder), and the public centre (the
    init word's vectors). Returns (the per-image folder, the centre's file)."""
    init = initial_vectors(backend, TI)
    key = SecureRandom().random_bytes(32)  # training randomness: the guarantee does not rely on it
    with tqdm_progress("dpagg: per-image training") as progress:
        per_image = train_sampled(backend, images, list(range(len(images))), key, init, TI, progress)
    files = folder / "per-image"
    files.mkdir()
    for i in range(len(images)):
        save_embedding(Embedding({k: v[i] for k, v in per_image.items()}), files / f"{i:04d}.safetensors")
    return files, save_embedding(Embedding(init), folder / "center.safetensors")


def _aggregate(per_image: Path, center: Path, name: str, epsilon: str) -> Path:
    """A DPAgg-TI release of the per-image embeddings, through `privdiff aggregate`."""
    out = OUT / f"{name}.safetensors"
    _privdiff(["aggregate", "--embeddings", str(per_image), "--one-image-per-file", "--center", str(center),
               "--out", str(out), "--epsilon", epsilon, "--sample-rate", "1", "--clip-norm", DPAGG_CLIP])
    return _with_sidecar(out)


def _dpsgd(private: str, name: str, epsilon: str) -> Path:
    """The DP-SGD TI baseline, through `privdiff ti-aggregate --method dpsgd`."""
    out = OUT / f"{name}.safetensors"
    _privdiff(["ti-aggregate", "--model", "small", "--images", private, "--method", "dpsgd", "--out", str(out),
               "--epsilon", epsilon, "--sample-rate", "0.16", "--clip-norm", "0.2", "--steps", "40",
               "--lr", str(SHARED.lr)])
    return _with_sidecar(out)


def _target(private: str) -> Path:
    """A DP style target (ε = 1) from the private images, through `privdiff guidance target`."""
    out = OUT / "target-eps1.safetensors"
    _privdiff(["guidance", "target", "--images", private, "--image-encoder", "small", "--out", str(out),
               "--epsilon", "1"])
    return out


def _guided_rows(pipe, classifier, target_file: Path) -> list[tuple[str, list[Image.Image]]]:
    """Plain prompts (no style word), sampled without and with guidance toward the DP target."""
    encoder, target = load_small_encoder(), load_target(target_file)
    check_encoder(target, encoder, target_file, "the small model's encoder")
    rows = []
    for label, config in (("no style in the prompt, no guidance", replace(GUIDANCE, weight=0.0, recurrence=1)),
                          (f"guided to the DP target, ε = 1 (w {GUIDANCE.weight:g}, k {GUIDANCE.recurrence})",
                           GUIDANCE)):
        rows.append(_row(label, *evaluate_guided_samples(pipe, classifier, STYLE, encoder, target.vector, config,
                                                         count=SAMPLES)))
    return rows


def _nonprivate_ti(backend: DiffusersBackend, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Ordinary textual inversion on all private images (kept in memory: it carries no guarantee)."""
    gen = torch.Generator().manual_seed(0)
    latents = encode_in_batches(backend, images, 64, gen)
    return train_shared_embedding(backend, latents, initial_vectors(backend, SHARED), SHARED, gen)


def _row(name: str, result: Score, images: torch.Tensor) -> tuple[str, list[Image.Image]]:
    """A grid row: its label with the score, and the first COLUMNS of the samples scored."""
    return f"{name}\nstyle {result.style:.0%} · prompt {result.adherence:.0%}", [_to_pil(x) for x in images[:COLUMNS]]


def _to_pil(x: torch.Tensor) -> Image.Image:
    array = (x.clamp(0, 1).permute(1, 2, 0) * 255).round().byte().numpy()
    return Image.fromarray(array).resize((CELL, CELL), Image.Resampling.NEAREST)


def run() -> int:
    """Run the demo; returns a process exit code."""
    OUT.mkdir(exist_ok=True)
    torch.manual_seed(0)
    pipe = load_small()
    backend = DiffusersBackend(pipe)
    backend.freeze()
    with (tempfile.TemporaryDirectory(prefix="privdiff-demo-private-") as private,
          tempfile.TemporaryDirectory(prefix="privdiff-demo-per-image-") as scratch):
        write_style_folder(private, STYLE, COUNT, seed=0)
        _, images = load_image_folder(private, backend.resolution)
        per_image, center = _per_image(backend, images, Path(scratch))
        files = [(_aggregate(per_image, center, name, eps), label) for name, eps, label in DPAGG]
        files.append((_dpsgd(private, *DPSGD[:2]), DPSGD[2]))
        target_file = _target(private)
        nonprivate = _nonprivate_ti(backend, images)
        examples = [Image.open(p).convert("RGB").resize((CELL, CELL), Image.Resampling.NEAREST)
                    for p in sorted(Path(private).glob("*.png"))[:COLUMNS]]
    classifier = load_classifier(WEIGHTS)
    rows = [("private images (never released)", examples),
            _row("init word 'style' alone", *evaluate_samples(pipe, classifier, STYLE, word="style", count=SAMPLES)),
            _row("TI, ε = ∞ (not private)", *evaluate_samples(pipe, classifier, STYLE, vectors=nonprivate,
                                                               count=SAMPLES))]
    for path, label in files:
        pipe.load_textual_inversion(str(path), token=path.stem)
        rows.append(_row(label, *evaluate_samples(pipe, classifier, STYLE, word=path.stem, count=SAMPLES)))
    rows += _guided_rows(pipe, classifier, target_file)
    header = [f"{c} {s}" for s, c in prompt_pairs(SAMPLES, 0)[:COLUMNS]]
    draw_grid(rows, header).save(OUT / "grid.png")
    print(f"\nwrote {', '.join(str(p) for p, _ in files)} (+ .privacy.json reports), {target_file} and "
          f"{OUT / 'grid.png'}", file=sys.stderr)
    for label, _ in rows[1:]:
        print("  " + label.replace("\n", ": "), file=sys.stderr)
    print("use them: ComfyUI 'embedding:dpagg-eps1', A1111 'dpagg-eps1', diffusers load_textual_inversion",
          file=sys.stderr)
    run_spectral(OUT)
    return 0

