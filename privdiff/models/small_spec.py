"""What the small reference model is, without loading it: its image size, the world it draws (the caption
grammar and its colours, rendered by ``privdiff.reference.shapes``) and where its weights ship.

No diffusers or transformers import, so the image encoder and the A1111 extension's import path can use it.
"""

from __future__ import annotations

from pathlib import Path

SIZE = 32

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {"red": (0.92, 0.12, 0.10), "green": (0.15, 0.80, 0.20), "blue": (0.15, 0.30, 0.95),
           "yellow": (0.98, 0.88, 0.10), "white": (0.96, 0.96, 0.96)}
BACKGROUNDS = {"black": (0.07, 0.07, 0.09), "purple": (0.40, 0.14, 0.52), "orange": (0.88, 0.45, 0.08),
               "teal": (0.04, 0.44, 0.44), "gray": (0.50, 0.50, 0.50)}
TEXTURES = ("plain", "stripes", "dots", "checks", "waves")
WORDS = (*SHAPES, *COLOURS, *BACKGROUNDS, *TEXTURES)
"""Every word of the caption grammar besides the templates' words."""

WEIGHTS = Path(__file__).parent / "small_weights"
"""The shipped diffusers folder of the trained model (and the style classifier next to it)."""
SPECTRAL_PRIOR = Path(__file__).parent / "small_spectral_prior.safetensors"
"""The shipped public spectral prior of the same world at 16 px (and its tokenizer): what the demo fine-tunes."""
