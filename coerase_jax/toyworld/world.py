"""The synthetic world: one coloured shape on a light canvas, and the ways captions name it.

Each shape has one *name* ("circle") and several *paraphrases* ("disc", "ball", "round dot") that
never use the name; training captions mix both, so the model learns that "a red disc" is a red
circle. Erasing the word "circle" from text alone can then miss the paraphrases, which is the gap
Co-Erasing's image stage closes.

Rendering is numpy with 4x supersampling (anti-aliased edges), seeded and fast (~20k images/s).
"""

from __future__ import annotations

import dataclasses

import numpy as np

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
RGB = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (40, 80, 215), "yellow": (225, 195, 30)}
BACKGROUND = 240
NAMES = {"circle": "circle", "square": "square", "triangle": "triangle"}
PARAPHRASES = {
    "circle": ("disc", "ball", "round dot"),
    "square": ("box", "block", "tile"),
    "triangle": ("wedge", "pyramid", "three-sided shape"),
}
TEMPLATES = ("a {colour} {noun}", "a picture of a {colour} {noun}", "a photo of a {colour} {noun}",
             "{colour} {noun}")
# Captions that leave the colour out ("a circle": a circle of any colour): a share of the UNet's and
# IP-Adapter's training captions (TrainPlan.colourless_fraction), and the concept prompts of erasure.
COLOURLESS_TEMPLATES = ("a {noun}", "a picture of a {noun}", "a photo of a {noun}")
_SUPERSAMPLE = 4


@dataclasses.dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    radius: float  # half-extent in pixels
    centre: tuple[float, float]  # (x, y) in pixels


def random_scenes(rng: np.random.Generator, count: int, shapes=SHAPES, colours=COLOURS) -> list[Scene]:
    scenes = []
    for _ in range(count):
        radius = rng.uniform(7.0, 11.0)
        margin = radius + 2.0
        centre = tuple(rng.uniform(margin, IMAGE_SIZE - margin, size=2))
        scenes.append(Scene(str(rng.choice(shapes)), str(rng.choice(colours)), radius, centre))
    return scenes


def _coverage(scene: Scene) -> np.ndarray:
    """Fraction of each pixel the shape covers, (H, W) in [0, 1]."""
    n = IMAGE_SIZE * _SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / _SUPERSAMPLE
    x, y = np.meshgrid(coords, coords)
    cx, cy = scene.centre
    dx, dy, r = x - cx, y - cy, scene.radius
    if scene.shape == "circle":
        inside = dx ** 2 + dy ** 2 <= r ** 2
    elif scene.shape == "square":
        half = 0.886 * r  # same area as the circle
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif scene.shape == "triangle":
        # upright equilateral triangle; circumradius chosen so its area matches the circle's
        big = 1.555 * r
        top, base = cy - big, cy + big / 2
        half_width = (y - top) / (base - top) * big * np.sqrt(3) / 2
        inside = (y >= top) & (y <= base) & (np.abs(dx) <= half_width)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    return inside.reshape(IMAGE_SIZE, _SUPERSAMPLE, IMAGE_SIZE, _SUPERSAMPLE).mean(axis=(1, 3))


def render(scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
    """(H, W, 3) uint8. With ``rng``, the colour is jittered a little (±12 per channel)."""
    colour = np.asarray(RGB[scene.colour], np.float32)
    if rng is not None:
        colour = np.clip(colour + rng.uniform(-12, 12, 3), 0, 255)
    alpha = _coverage(scene)[..., None]
    image = alpha * colour + (1.0 - alpha) * BACKGROUND
    return np.round(image).astype(np.uint8)


def render_many(scenes: list[Scene], rng: np.random.Generator | None = None) -> np.ndarray:
    return np.stack([render(s, rng) for s in scenes])


def nouns(shape: str) -> tuple[str, ...]:
    return (NAMES[shape],) + PARAPHRASES[shape]


def all_captions() -> list[tuple[str, str, str | None]]:
    """Every caption the world produces, as (caption, shape, colour or None when it names none)."""
    coloured = [(t.format(colour=c, noun=n), s, c) for s in SHAPES for c in COLOURS for n in nouns(s)
                for t in TEMPLATES]
    colourless = [(t.format(noun=n), s, None) for s in SHAPES for n in nouns(s) for t in COLOURLESS_TEMPLATES]
    return coloured + colourless


def concept_prompts(shape: str) -> list[str]:
    """The shape named alone, in every colourless template: what erasing it trains on."""
    return [t.format(noun=NAMES[shape]) for t in COLOURLESS_TEMPLATES]


def named_prompts(shape: str) -> list[str]:
    return [f"a {c} {NAMES[shape]}" for c in COLOURS]


def paraphrase_prompts(shape: str) -> list[str]:
    return [f"a {c} {p}" for c in COLOURS for p in PARAPHRASES[shape]]


def vocabulary() -> list[str]:
    """The words a caption can contain (the tokenizer gets one token for each)."""
    words = set()
    for text, _, _ in all_captions():
        words.update(text.replace("-", " - ").split())
    return sorted(words)
