"""`make demo`: a DPAgg-TI release on the built-in tiny model, end to end, offline.

Writes under ./privdiff-demo/: the DP embedding, its privacy report and a PNG grid sampled with it
through diffusers' own ``load_textual_inversion`` (the tiny model has random weights, so the grid
shows that the file loads and conditions generation, not a learned style).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image

from privdiff.cli import main as cli_main
from privdiff.demo_data import write_style_images
from privdiff.embeddings.files import load_embedding
from privdiff.privacy.report import PrivacyReport

OUT = Path("privdiff-demo")
TOKEN = "privdiff-demo-style"


def sample_grid(embedding: Path, prompt: str, count: int = 4, steps: int = 20) -> Image.Image:
    """Two rows of ``prompt`` from the tiny model, same seeds: with the embedding, then with its
    init word "style" in its place (no private information)."""
    from privdiff.backends.tiny import tiny_pipeline

    pipe = tiny_pipeline("sd1")
    pipe.load_textual_inversion(str(embedding), token=TOKEN)
    grid = Image.new("RGB", (128 * count, 256))
    for row, word in enumerate((TOKEN, "style")):
        generator = torch.Generator().manual_seed(0)
        images = pipe(prompt.format(word), num_inference_steps=steps, num_images_per_prompt=count,
                      generator=generator, height=32, width=32).images
        for i, image in enumerate(images):
            grid.paste(image.resize((128, 128), Image.Resampling.NEAREST), (128 * i, 128 * row))
    return grid


def run() -> int:
    """Run the demo; returns a process exit code."""
    OUT.mkdir(exist_ok=True)
    embedding = OUT / f"{TOKEN}.safetensors"
    with tempfile.TemporaryDirectory(prefix="privdiff-demo-private-") as private:
        write_style_images(private, count=24, size=32)
        code = cli_main([
            "ti-aggregate", "--model", "tiny", "--images", private, "--out", str(embedding),
            "--epsilon", "8", "--delta", "1e-3", "--steps", "30", "--batch-size", "8", "--vectors", "1",
            "--public-size", "24",  # generated data: its size is public, so the guarantee is add-remove
            "--dataset-label", "demo: generated warm-rings style", "--force",
        ])
    if code:
        return code
    report = PrivacyReport.from_metadata(load_embedding(embedding).metadata)
    report.write_sidecar(embedding, force=True)
    grid = sample_grid(embedding, "a painting in the style of {}")
    grid.save(OUT / "grid.png")
    print(f"\nwrote {embedding}, {embedding}.privacy.json and {OUT / 'grid.png'}", file=sys.stderr)
    print(f"use it: ComfyUI 'embedding:{TOKEN}', A1111 '{TOKEN}', diffusers load_textual_inversion", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run())
