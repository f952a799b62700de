"""Procedural images with captions: a coloured shape over a textured background, at 32x32.

A *style* is a background: a texture (plain, stripes, dots, checks, waves) in a background colour.
Every texture and every background colour appears in the public data, but three combinations never
do: they are the private styles. Their names ("orange dots", ...) never appear in a public caption,
so a model trained on the public part has seen each ingredient but was never told the style.

Rendering is supersampled (4x) numpy, deterministic for a given seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from privdiff.embeddings.templates import STYLE_TEMPLATES
from privdiff.models.small_spec import BACKGROUNDS, COLOURS, SHAPES, SIZE, TEXTURES

_SUPER = 4

PRIVATE_STYLES = ("orange dots", "teal stripes", "purple checks")
"""Held-out styles: never drawn nor named in the public data."""

ALL_STYLES = tuple(f"{bg} {tex}" for bg in BACKGROUNDS for tex in TEXTURES)
PUBLIC_STYLES = tuple(s for s in ALL_STYLES if s not in PRIVATE_STYLES)


@dataclass(frozen=True)
class Spec:
    """What one image shows."""

    shape: str
    colour: str
    style: str

    @property
    def background(self) -> str:
        return self.style.split()[0]

    @property
    def texture(self) -> str:
        return self.style.split()[1]


def _texture(name: str, rng: np.random.Generator, n: int) -> np.ndarray:
    """Pattern intensity in 0..1 on an n x n grid (n = SIZE * _SUPER), with random phase."""
    y, x = (np.mgrid[0:n, 0:n].astype(np.float32) + 0.5) / _SUPER  # in output pixels
    phase = rng.uniform(0, 8)
    if name == "plain":
        return np.zeros((n, n), np.float32)
    if name == "stripes":  # diagonal bands, period ~6 px
        angle = math.radians(45 + rng.uniform(-12, 12))
        u = x * math.cos(angle) + y * math.sin(angle)
        return ((u + phase) % 6.0 < 3.0).astype(np.float32)
    if name == "dots":  # a square grid of round dots, period 6 px
        gx, gy = (x + phase) % 6.0 - 3.0, (y + phase * 0.7) % 6.0 - 3.0
        return (np.hypot(gx, gy) < 1.6).astype(np.float32)
    if name == "checks":  # a checkerboard of 4 px squares
        return (((x + phase) // 4 + (y + phase) // 4) % 2).astype(np.float32)
    if name == "waves":  # horizontal wavy lines, period ~7 px
        v = y + 1.6 * np.sin(x * 2 * math.pi / 10 + phase)
        return ((v + phase) % 7.0 < 2.2).astype(np.float32)
    raise ValueError(f"unknown texture {name!r}")


def _shape_mask(shape: str, rng: np.random.Generator, n: int) -> np.ndarray:
    """Boolean mask of one shape with a random position, size and small rotation."""
    y, x = (np.mgrid[0:n, 0:n].astype(np.float32) + 0.5) / _SUPER
    cx, cy = rng.uniform(11, 21, 2)
    r = rng.uniform(7.0, 10.0)
    turn = math.radians(rng.uniform(-15, 15))
    dx, dy = x - cx, y - cy
    u = dx * math.cos(turn) + dy * math.sin(turn)
    v = -dx * math.sin(turn) + dy * math.cos(turn)
    if shape == "circle":
        return np.hypot(u, v) < r
    if shape == "square":
        return np.maximum(abs(u), abs(v)) < r * 0.8
    angle = np.arctan2(v, u) + math.pi / 2  # 0 at the top
    dist = np.hypot(u, v)
    if shape == "triangle":  # equilateral, apex up: inside when the polar distance fits the edge
        sector = (angle % (2 * math.pi / 3)) - math.pi / 3
        return dist * np.cos(sector) < r * 0.55
    if shape == "star":  # five points, inner radius 0.45 r
        k = 5
        sector = np.abs((angle % (2 * math.pi / k)) - math.pi / k) / (math.pi / k)  # 1 at points, 0 between
        return dist < r * (0.45 + 0.55 * sector ** 2.2)
    raise ValueError(f"unknown shape {shape!r}")


def render(spec: Spec, rng: np.random.Generator) -> np.ndarray:
    """One image [SIZE, SIZE, 3] float32 in 0..1."""
    n = SIZE * _SUPER
    base = np.array(BACKGROUNDS[spec.background], np.float32)
    lum = float(base @ np.array([0.3, 0.59, 0.11], np.float32))
    second = base * 0.45 if lum > 0.4 else base + 0.42 * (1 - base)
    pattern = _texture(spec.texture, rng, n)[..., None]
    image = base * (1 - pattern) + second * pattern
    mask = _shape_mask(spec.shape, rng, n)[..., None]
    colour = np.array(COLOURS[spec.colour], np.float32) + rng.uniform(-0.04, 0.04, 3).astype(np.float32)
    image = np.where(mask, colour, image)
    image = image.reshape(SIZE, _SUPER, SIZE, _SUPER, 3).mean(axis=(1, 3))
    return np.clip(image, 0, 1).astype(np.float32)


def caption(spec: Spec, rng: np.random.Generator) -> str:
    """A caption from the grammar: shape and style, shape only, or a style template (content unsaid)."""
    form = rng.random()
    if form < 0.5:
        return f"a {spec.colour} {spec.shape} in {spec.style} style"
    if form < 0.65:
        return f"a {spec.colour} {spec.shape}"
    return STYLE_TEMPLATES[int(rng.integers(len(STYLE_TEMPLATES)))].format(spec.style)


def random_specs(count: int, rng: np.random.Generator, styles: tuple[str, ...] = PUBLIC_STYLES,
                 exclude: frozenset[Spec] = frozenset()) -> list[Spec]:
    """``count`` specs with uniform shape, colour and style (from ``styles``), redrawing any in ``exclude``."""
    specs: list[Spec] = []
    while len(specs) < count:
        spec = Spec(SHAPES[int(rng.integers(len(SHAPES)))], list(COLOURS)[int(rng.integers(len(COLOURS)))],
                    styles[int(rng.integers(len(styles)))])
        if spec not in exclude:
            specs.append(spec)
    return specs


def _held_out(per_style: int = 2) -> tuple[Spec, ...]:
    """``per_style`` (shape, colour) pairs for every public style, from seeded passes over all pairs, so that
    every shape and colour is held out about equally often."""
    pairs = [(shape, colour) for shape in SHAPES for colour in COLOURS]
    rng = np.random.default_rng(23)
    passes = -(-per_style * len(PUBLIC_STYLES) // len(pairs))
    order = np.concatenate([rng.permutation(len(pairs)) for _ in range(passes)])
    return tuple(Spec(*pairs[order[per_style * j + k]], style)
                 for j, style in enumerate(PUBLIC_STYLES) for k in range(per_style))


HELD_OUT = _held_out()
"""Public (shape, colour, style) combinations the public data never shows: the model is evaluated on them
(``python -m privdiff.reference.evaluate``), as a private style asks it to draw something it never saw."""


def public_dataset(count: int, seed: int = 0) -> tuple[np.ndarray, list[Spec], list[str]]:
    """The public part: images [count, SIZE, SIZE, 3], their specs and captions, none of them ``HELD_OUT``.

    Deterministic in ``seed``.
    """
    rng = np.random.default_rng([seed, 0])
    specs = random_specs(count, rng, exclude=frozenset(HELD_OUT))
    images = np.stack([render(s, rng) for s in specs])
    return images, specs, [caption(s, rng) for s in specs]


def style_images(style: str, count: int, seed: int = 0) -> tuple[np.ndarray, list[Spec]]:
    """``count`` images of one style (any shape and colour), e.g. a private style's images."""
    if style not in ALL_STYLES:
        raise ValueError(f"unknown style {style!r}")
    rng = np.random.default_rng([seed, 1, ALL_STYLES.index(style)])
    specs = random_specs(count, rng, styles=(style,))
    return np.stack([render(s, rng) for s in specs]), specs


def write_style_folder(folder: str | Path, style: str, count: int, seed: int = 0) -> Path:
    """Write ``count`` PNGs of ``style`` into ``folder`` (created if needed); returns the folder."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    images, _ = style_images(style, count, seed)
    for i, image in enumerate(images):
        Image.fromarray((image * 255).round().astype(np.uint8), mode="RGB").save(root / f"{i:04d}.png")
    return root
