"""`make demo`: learn a private style on the small reference model, with and without differential privacy.

The private images are procedural shapes in the style "teal stripes", a combination the reference
model never saw in its public training data and was never told the name of. The demo releases
three DP embeddings through the `privdiff` command (DPAgg-TI at ε = 3 and ε = 1, DP-SGD TI at ε = 1),
trains a non-private textual inversion in memory for comparison (never written: it is not private),
releases a DP style target at ε = 1 (`privdiff guidance target`, with the small model's public image
encoder) and samples plain prompts with universal guidance toward it. It writes under ./privdiff-demo/:
the embedding and target files with their privacy reports, and grid.png, sampled with the same seeds
in every row (the embeddings through diffusers' own ``load_textual_inversion``), each row labelled with
its style score (the fraction of 40 samples the style classifier reads as the private style) and
prompt adherence (shape and colour as asked). Then the spectral demo (``privdiff.demo.spectral``) releases
a DP spectral prior (ε = 10) on the same private images and writes spectral-grid.png.
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
from privdiff.embeddings.dpagg import encode_in_batches
from privdiff.embeddings.files import load_embedding
from privdiff.embeddings.textual_inversion import PLACEHOLDER, TIConfig, initial_vectors, train_shared_embedding
from privdiff.guidance.sampler import GuidanceConfig
from privdiff.guidance.target import check_encoder, load_target
from privdiff.io.images import load_image_folder
from privdiff.models.diffusers_backend import DiffusersBackend
from privdiff.models.image_encoders import load_small_encoder
from privdiff.models.small import WEIGHTS, load_small
from privdiff.models.small_classifier import load_classifier
from privdiff.privacy.report import PrivacyReport
from privdiff.reference.evaluate import PROMPT, evaluate, evaluate_guided, generate, generate_guided
from privdiff.reference.score import Score
from privdiff.reference.shapes import write_style_folder

OUT = Path("privdiff-demo")
STYLE = "teal stripes"
COUNT = 100
DELTA = "1e-5"
TI = TIConfig(steps=40, lr=2e-2, batch_size=50)
"""Per-image training for DPAgg-TI; the non-private TI and DP-SGD train one embedding with these too."""
GUIDANCE = GuidanceConfig(steps=25, cfg=5.0, weight=6.0, recurrence=2)
"""Universal guidance toward the DP style target (the small model's public encoder stands in for CLIP)."""
RELEASES = (("dpagg-eps3", "dpagg", "3", "DPAgg-TI, ε = 3"), ("dpagg-eps1", "dpagg", "1", "DPAgg-TI, ε = 1"),
            ("dpsgd-eps1", "dpsgd", "1", "DP-SGD TI, ε = 1"))
COLUMNS = (("blue", "star"), ("red", "circle"), ("yellow", "square"), ("white", "triangle"), ("green", "star"),
           ("red", "square"))


def _release(private: str, name: str, method: str, epsilon: str) -> Path:
    out = OUT / f"{name}.safetensors"
    extra = ["--sample-rate", "0.16", "--clip-norm", "0.2", "--steps", "60"] if method == "dpsgd" else [
        "--sample-rate", "1", "--clip-norm", "4", "--steps", str(TI.steps), "--batch-size", str(TI.batch_size)]
    code = cli_main([
        "ti-aggregate", "--model", "small", "--images", private, "--method", method, "--out", str(out),
        "--epsilon", epsilon, "--delta", DELTA, "--lr", str(TI.lr), *extra,
        "--public-size", str(COUNT),  # generated data: its size is public, so the guarantee is add-remove
        "--dataset-label", f"demo: generated '{STYLE}' style", "--force",
    ])
    if code:
        raise SystemExit(code)
    PrivacyReport.from_metadata(load_embedding(out).metadata).write_sidecar(out, force=True)
    return out


def _target(private: str) -> Path:
    """A DP style target (ε = 1) from the private images, through `privdiff guidance target`."""
    out = OUT / "target-eps1.safetensors"
    code = cli_main(["guidance", "target", "--images", private, "--image-encoder", "small", "--out", str(out),
                     "--epsilon", "1", "--delta", DELTA, "--public-size", str(COUNT),
                     "--dataset-label", f"demo: generated '{STYLE}' style", "--force"])
    if code:
        raise SystemExit(code)
    return out


def _guided_rows(pipe, classifier, target_file: Path) -> list[tuple[str, list[Image.Image]]]:
    """Plain prompts (no style word), sampled without and with guidance toward the DP target."""
    encoder, target = load_small_encoder(), load_target(target_file)
    check_encoder(target, encoder, target_file, "the small model's encoder")
    prompts = [f"a {c} {s}" for c, s in COLUMNS]
    rows = []
    for label, config in (("no style in the prompt, no guidance", replace(GUIDANCE, weight=0.0, recurrence=1)),
                          (f"guided to the DP target, ε = 1 (w {GUIDANCE.weight:g}, k {GUIDANCE.recurrence})",
                           GUIDANCE)):
        result = evaluate_guided(pipe, classifier, STYLE, encoder, target.vector, config)
        images = generate_guided(pipe, prompts, encoder, target.vector, config, seed=1)
        rows.append((_label(label, result), [_to_pil(x) for x in images]))
    return rows


def _nonprivate_ti(pipe, private: str) -> dict[str, torch.Tensor]:
    """Ordinary textual inversion on all private images (kept in memory: it carries no guarantee)."""
    backend = DiffusersBackend(pipe)
    backend.freeze()
    _, images = load_image_folder(private, backend.resolution)
    gen = torch.Generator().manual_seed(0)
    latents = encode_in_batches(backend, images, 64, gen)
    config = TIConfig(steps=150, lr=TI.lr, batch_size=16)
    return train_shared_embedding(backend, latents, initial_vectors(backend, config), config, gen)


def _row(pipe, token_or_vectors: str | dict[str, torch.Tensor]) -> list[Image.Image]:
    """One sample per column prompt, with a word/loaded token, or with in-memory vectors."""
    vectors = token_or_vectors if isinstance(token_or_vectors, dict) else None
    token = PLACEHOLDER if vectors is not None else token_or_vectors
    prompts = [PROMPT.format(colour=c, shape=s, token=token) for c, s in COLUMNS]
    images = generate(pipe, prompts, vectors, seed=1)
    return [_to_pil(x) for x in images]


def _to_pil(x: torch.Tensor) -> Image.Image:
    array = (x.clamp(0, 1).permute(1, 2, 0) * 255).round().byte().numpy()
    return Image.fromarray(array).resize((CELL, CELL), Image.Resampling.NEAREST)


def _label(name: str, result: Score) -> str:
    return f"{name}\nstyle {result.style:.0%} · prompt {result.adherence:.0%}"


def run() -> int:
    """Run the demo; returns a process exit code."""
    OUT.mkdir(exist_ok=True)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="privdiff-demo-private-") as private:
        write_style_folder(private, STYLE, COUNT, seed=0)
        files = [(_release(private, name, method, eps), label) for name, method, eps, label in RELEASES]
        target_file = _target(private)
        pipe = load_small()
        nonprivate = _nonprivate_ti(pipe, private)
        examples = [Image.open(p).convert("RGB").resize((CELL, CELL), Image.Resampling.NEAREST)
                    for p in sorted(Path(private).glob("*.png"))[:len(COLUMNS)]]
    classifier = load_classifier(WEIGHTS)
    rows = [("private images (never released)", examples),
            (_label("init word 'style' alone", evaluate(pipe, classifier, STYLE, word="style")),
             _row(pipe, "style")),
            (_label("TI, ε = ∞ (not private)", evaluate(pipe, classifier, STYLE, vectors=nonprivate)),
             _row(pipe, nonprivate))]
    for path, label in files:
        pipe.load_textual_inversion(str(path), token=path.stem)
        rows.append((_label(label, evaluate(pipe, classifier, STYLE, word=path.stem)), _row(pipe, path.stem)))
    rows += _guided_rows(pipe, classifier, target_file)
    header = [f"{c} {s}" for c, s in COLUMNS]
    draw_grid(rows, header).save(OUT / "grid.png")
    print(f"\nwrote {', '.join(str(p) for p, _ in files)} (+ .privacy.json reports), {target_file} and "
          f"{OUT / 'grid.png'}", file=sys.stderr)
    for label, _ in rows[1:]:
        print("  " + label.replace("\n", ": "), file=sys.stderr)
    print("use them: ComfyUI 'embedding:dpagg-eps1', A1111 'dpagg-eps1', diffusers load_textual_inversion",
          file=sys.stderr)
    run_spectral(OUT)
    return 0

